"""The peers: SCP launchers (subprocesses) and SCU drivers (in-process or DCMTK commands).

What each SCU timer covers:

- dicomnet and pynetdicom SCUs run in this process; the timer starts before the first
  association request and stops after the last release (S2-S4: one association, so
  association set-up and release are inside the time; S1: every one of them is).
- DCMTK SCUs are timed as the wall time of the command(s), so process start-up,
  reading the data dictionary and (storescu) scanning the input folder are inside it.
  S1 with DCMTK is a loop of 300 ``echoscu`` processes: it is bound by process start-up.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.data import InstanceSet
from benchmarks.procs import HOST, ServerProcess
from benchmarks.tls import pki

REPO_ROOT = Path(__file__).resolve().parents[1]
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
SCU_AET = "BENCHSCU"
MAX_ERRORS_KEPT = 5
IDLE_SECONDS = 10.0  # S8: how long the server's CPU is measured with every association idle
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"


# --- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class ClientResult:
    """What one SCU run did: elapsed seconds, operations that succeeded or failed."""

    seconds: float
    ok: int
    failed: int
    cpu_seconds: float
    errors: list[str] = field(default_factory=list)
    # Scenario-specific figures (S7/S9: scu_peak_rss_mib; S8: kib_per_association, ...).
    extra: dict[str, float] = field(default_factory=dict)

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)


@functools.cache
def dcmtk(tool: str) -> str:
    """Path of DCMTK's `tool` on PATH, skipping scripts: pynetdicom installs Python apps
    with the same names (echoscu, storescu, storescp, findscu) into the venv's bin folder,
    which shadow DCMTK's binaries when the venv is activated. `tool` itself if none."""
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder or ".") / tool
        try:
            if not (candidate.is_file() and os.access(candidate, os.X_OK)):
                continue
            with open(candidate, "rb") as f:
                if f.read(2) == b"#!":
                    continue
        except OSError:
            continue
        return str(candidate)
    return tool


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- SCPs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SCPSpec:
    """How to start one SCP: its argv and environment for a port, a storage folder and the
    scenario's count (used by the C-FIND SCPs: the number of matches to answer with)."""

    key: str
    label: str
    durability: str
    build: Callable[[int, Path, int], tuple[list[str], dict[str, str]]]
    listeners: int = 1  # processes listening on the port (serve --workers N)

    def command(self, port: int, storage: Path, count: int) -> tuple[list[str], dict[str, str]]:
        return self.build(port, storage, count)


def _base_env(*, nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        # DCMTK >= 3.6.2 leaves Nagle's algorithm on unless TCP_NODELAY is set (envvars.txt).
        env["TCP_NODELAY"] = "1"
    return env


def _loop_env(env: dict[str, str], loop: str) -> dict[str, str]:
    """The `dicomnet` commands run on uvloop when it is installed, unless told otherwise."""
    env = {k: v for k, v in env.items() if k != "DICOMNET_LOOP"}
    if loop == "asyncio":
        env["DICOMNET_LOOP"] = "asyncio"
    return env


def dicomnet_scp(
    *,
    fsync: bool,
    workers: int = 1,
    loop: str = "uvloop",
    tls: bool = False,
    max_pdu: int | None = None,
) -> SCPSpec:
    """`dicomnet serve`; `loop="asyncio"` runs it without uvloop; `tls`: with
    `--tls-cert/--tls-key --tls-ca` (client certificates required, as storescp +tls);
    `max_pdu`: `--max-pdu` (the PDU size the SCU sends)."""

    def build(port: int, storage: Path, _count: int) -> tuple[list[str], dict[str, str]]:
        argv = [
            sys.executable,
            "-m",
            "dicomnet",
            "serve",
            "--host",
            HOST,
            "--port",
            str(port),
            "--storage",
            str(storage),
        ]
        if not fsync:
            argv.append("--no-fsync")
        if workers > 1:
            argv += ["--workers", str(workers)]
        if tls:
            certs = pki()
            argv += ["--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key)]
            argv += ["--tls-ca", str(certs.ca)]
        if max_pdu is not None:
            argv += ["--max-pdu", str(max_pdu)]
        return argv, _loop_env(_base_env(nodelay=False), loop)

    # `dicomnet serve` also records every instance in its SQLite index (Q/R), after the
    # response, in a background process: the file is re-read up to the pixel data, one
    # commit per batch (WAL, synchronous=NORMAL).
    index = "; indexed in SQLite in the background, in batches (WAL, no fsync per commit)"
    key = "dicomnet-fsync" if fsync else "dicomnet-nofsync"
    label = "dicomnet serve" if fsync else "dicomnet serve --no-fsync"
    if workers > 1:
        key += f"-w{workers}"
        label += f" --workers {workers}"
    if loop == "asyncio":
        key += "-asyncio"
        label = f"DICOMNET_LOOP=asyncio {label}"
    if tls:
        key += "-tls"
        label += " --tls-cert/--tls-key --tls-ca"
    if max_pdu is not None:
        key += f"-pdu{max_pdu}"
        label += f" --max-pdu {max_pdu}"
    if fsync:
        durability = "unnamed file (O_TMPFILE), fsync, linked in place, fsync of the folder" + index
    else:
        durability = "unnamed file (O_TMPFILE) linked in place, no fsync (page cache)" + index
    return SCPSpec(key, label, durability, build, listeners=workers)


def dicomnet_find_scp() -> SCPSpec:
    """benchmarks/find_scp.py: a dicomnet `AE` whose `on_find` yields `count` identifiers."""

    def build(port: int, _storage: Path, count: int) -> tuple[list[str], dict[str, str]]:
        argv = [sys.executable, "-m", "benchmarks.find_scp", "--port", str(port)]
        argv += ["--matches", str(count)]
        return argv, _base_env(nodelay=False)

    return SCPSpec(
        "dicomnet-find",
        "dicomnet AE, on_find generator (benchmarks/find_scp.py)",
        "nothing stored: generated C-FIND identifiers",
        build,
    )


def pynetdicom_scp() -> SCPSpec:
    def build(port: int, storage: Path, count: int) -> tuple[list[str], dict[str, str]]:
        argv = [
            sys.executable,
            "-m",
            "benchmarks.pynetdicom_scp",
            "--port",
            str(port),
            "--storage",
            str(storage),
            # S7: C-FIND answered with `count` identifiers (harmless for the other scenarios).
            "--find-matches",
            str(count),
        ]
        return argv, _base_env(nodelay=False)

    return SCPSpec(
        "pynetdicom",
        "pynetdicom AE (encoded_dataset() to file)",
        "plain write, no fsync (page cache); C-FIND: generated identifiers",
        build,
    )


def storescp_scp(
    *, nodelay: bool = True, fork: bool = False, tls: bool = False, max_pdu: int | None = None
) -> SCPSpec:
    """storescp; `tls`: `+tls KEY CERT +cf CA` (its default profile, non-downgrading BCP 195,
    and its default -rc: client certificates required); `max_pdu`: `--max-pdu`."""

    def build(port: int, storage: Path, _count: int) -> tuple[list[str], dict[str, str]]:
        argv = [dcmtk("storescp"), "+B", "-od", str(storage), "-aet", "STORESCP"]
        if fork:
            argv.append("--fork")  # one child process per association
        if tls:
            certs = pki()
            argv += ["+tls", str(certs.server_key), str(certs.server_cert), "+cf", str(certs.ca)]
        if max_pdu is not None:
            argv += ["--max-pdu", str(max_pdu)]
        argv.append(str(port))
        return argv, _base_env(nodelay=nodelay)

    label = "storescp +B" + ("" if nodelay else " (Nagle on)") + (" --fork" if fork else "")
    key = ("storescp" if nodelay else "storescp-nagle") + ("-fork" if fork else "")
    if tls:
        label += " +tls"
        key += "-tls"
    if max_pdu is not None:
        label += f" --max-pdu {max_pdu}"
        key += f"-pdu{max_pdu}"
    return SCPSpec(key, label, "bit-preserving write, no fsync (page cache)", build)


def count_stored(storage: Path) -> int:
    """Regular files under `storage`, skipping hidden files and folders (spools, temp files)."""
    total = 0
    for _root, dirs, names in os.walk(storage):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        total += sum(1 for n in names if not n.startswith("."))
    return total


# --- SCUs ----------------------------------------------------------------------------------


class SCU(Protocol):
    key: str
    label: str

    def echo_associations(self, port: int, count: int, timeout: float) -> ClientResult:
        """`count` associations in sequence, one C-ECHO each."""
        ...

    def echo_one(self, port: int, count: int, timeout: float) -> ClientResult:
        """`count` C-ECHOs on one association."""
        ...

    def store_one(self, port: int, instances: InstanceSet, timeout: float) -> ClientResult:
        """Every file of `instances` with C-STORE on one association."""
        ...

    def store_concurrent(
        self, port: int, parts: Sequence[InstanceSet], timeout: float
    ) -> ClientResult:
        """S6: one association per part, all at once, each storing its part's files."""
        ...

    def find(self, port: int, count: int, timeout: float) -> ClientResult:
        """S7/S9: one Patient Root C-FIND on one association; `count` matches expected."""
        ...

    def idle(self, port: int, count: int, timeout: float, server: ServerProcess) -> ClientResult:
        """S8: hold `count` idle associations open and measure the server meanwhile."""
        ...


def _unsupported(scu: object, what: str) -> NotImplementedError:
    return NotImplementedError(f"{type(scu).__name__} has no {what} driver")


def _kill_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """Terminate, then kill, every process of `procs` still running."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)


class DicomnetSCU:
    """dicomnet's Python API in this process, on uvloop when installed (as the `dicomnet`
    commands run) or, with `loop="asyncio"`, on asyncio's own loop."""

    def __init__(self, aec: str = "ANY-SCP", loop: str = "uvloop", *, tls: bool = False) -> None:
        self.aec = aec
        self.loop = loop
        self.key = "dicomnet" if loop == "uvloop" else f"dicomnet-{loop}"
        self.label = f"dicomnet (in-process API, {loop})"
        # TLS (S2, S4, S5 only): BCP 195 client context with the run's client certificate.
        self.connect_options: dict[str, Any] = {}
        if tls:
            from dicomnet.tls import client_context

            certs = pki()
            context = client_context(certs.ca, certs.client_cert, certs.client_key)
            self.connect_options["tls"] = context
            self.key += "-tls"
            self.label = f"dicomnet (in-process API, {loop}, TLS)"

    def echo_associations(self, port: int, count: int, timeout: float) -> ClientResult:
        import dicomnet

        async def body(result: ClientResult) -> None:
            contexts = [dicomnet.PresentationContext(VERIFICATION)]
            for _ in range(count):
                try:
                    async with dicomnet.connect(
                        HOST,
                        port,
                        aet=SCU_AET,
                        aec=self.aec,
                        contexts=contexts,
                        **self.connect_options,
                    ) as assoc:
                        await assoc.echo()
                    result.ok += 1
                except dicomnet.DicomNetError as exc:
                    result.failed += 1
                    result.error(f"{type(exc).__name__}: {exc}")

        return self._run(body, timeout)

    def echo_one(self, port: int, count: int, timeout: float) -> ClientResult:
        import dicomnet

        async def body(result: ClientResult) -> None:
            contexts = [dicomnet.PresentationContext(VERIFICATION)]
            try:
                async with dicomnet.connect(
                    HOST, port, aet=SCU_AET, aec=self.aec, contexts=contexts, **self.connect_options
                ) as assoc:
                    for _ in range(count):
                        try:
                            await assoc.echo()
                        except dicomnet.DimseError as exc:
                            result.failed += 1
                            result.error(f"DimseError: {exc}")
                        else:
                            result.ok += 1
            except dicomnet.DicomNetError as exc:
                result.failed += count - result.ok - result.failed
                result.error(f"{type(exc).__name__}: {exc}")

        return self._run(body, timeout)

    def store_one(self, port: int, instances: InstanceSet, timeout: float) -> ClientResult:
        import dicomnet

        sop_classes = [instances.sop_class_uid]

        async def body(result: ClientResult) -> None:
            contexts = [dicomnet.PresentationContext(s, (EXPLICIT_VR_LE,)) for s in sop_classes]
            try:
                async with dicomnet.connect(
                    HOST, port, aet=SCU_AET, aec=self.aec, contexts=contexts, **self.connect_options
                ) as assoc:
                    for path in instances.files:
                        try:
                            await assoc.store(path)
                        except dicomnet.DimseError as exc:
                            result.failed += 1
                            result.error(f"{path.name}: DimseError: {exc}")
                        else:
                            result.ok += 1
            except dicomnet.DicomNetError as exc:
                result.failed += len(instances.files) - result.ok - result.failed
                result.error(f"{type(exc).__name__}: {exc}")

        return self._run(body, timeout)

    def store_concurrent(
        self, port: int, parts: Sequence[InstanceSet], timeout: float
    ) -> ClientResult:
        """`python -m dicomnet bench --op store` (its own generated 2 KB instances): one
        process, len(parts) concurrent associations of len(parts[0]) stores each. The rate
        uses bench's own elapsed time (first association request to last release, like
        the in-process timers); the command's wall time is kept as `wall_s`."""
        total = sum(len(p.files) for p in parts)
        per = len(parts[0].files)
        argv = [sys.executable, "-m", "dicomnet", "bench", HOST, str(port), "--op", "store"]
        argv += ["--aec", self.aec, "--concurrency", str(len(parts))]
        argv += ["--per-association", str(per), "--count", str(total), "--json", "--no-progress"]
        result = ClientResult(0.0, 0, 0, 0.0)
        cpu0, t0 = _children_cpu(), time.perf_counter()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=False,
                env=_loop_env(dict(os.environ), self.loop),
            )
        except subprocess.TimeoutExpired:
            result.failed = total
            result.error(f"dicomnet bench timed out after {timeout:g} s")
            result.seconds = time.perf_counter() - t0
            return result
        wall = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        try:
            out: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError):
            text = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
            result.failed = total
            result.error(f"dicomnet bench exit {proc.returncode}: {text[-500:]}")
            result.seconds = wall
            return result
        result.seconds = float(out["elapsed_s"])
        result.ok = int(out["succeeded"]) + int(out.get("warnings", 0))
        result.failed = total - result.ok
        result.extra["wall_s"] = wall
        result.extra["associations"] = float(out.get("associations", 0))
        for status, n in dict(out.get("failures", {})).items():
            result.error(f"dicomnet bench: {n} failed with {status}")
        if out.get("association_failures"):
            result.error(f"dicomnet bench: {out['association_failures']} association failures")
        if proc.returncode != 0 and not result.errors:
            result.error(f"dicomnet bench exit {proc.returncode}")
        return result

    def find(self, port: int, count: int, timeout: float) -> ClientResult:
        """benchmarks/find_scu.py in its own process (so its peak RSS is measurable); the
        time is its own, from before the association request to after the release."""
        argv = [sys.executable, "-m", "benchmarks.find_scu", "--port", str(port)]
        argv += ["--timeout", f"{timeout:g}"]
        result = ClientResult(0.0, 0, count, 0.0)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout + 30,
                check=False,
                cwd=REPO_ROOT,
                env=_loop_env(dict(os.environ), self.loop),
            )
            out: dict[str, Any] = json.loads(proc.stdout.decode().strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            result.error(f"find_scu timed out after {timeout + 30:g} s")
            result.seconds = time.perf_counter() - t0
            return result
        except (ValueError, IndexError):
            result.error(f"find_scu exit {proc.returncode}: {proc.stderr.decode()[-500:]}")
            result.seconds = time.perf_counter() - t0
            return result
        result.seconds = float(out["seconds"])
        result.cpu_seconds = float(out["cpu_seconds"])
        result.ok = min(int(out["matches"]), count)
        result.failed = count - result.ok
        result.extra["scu_peak_rss_mib"] = int(out["peak_rss_kib"]) / 1024
        if out.get("error"):
            result.error(str(out["error"]))
        if int(out["matches"]) != count:
            result.error(f"{out['matches']} matches received, {count} expected")
        return result

    def idle(self, port: int, count: int, timeout: float, server: ServerProcess) -> ClientResult:
        """Open `count` associations one after the other from this process and hold them;
        then, with all of them open and silent: the server's RSS growth per association
        (VmRSS after minus before, / count), its CPU over IDLE_SECONDS (% of one core,
        process group), then the time of one more association + C-ECHO + release.
        The rate is associations opened per second."""
        import contextlib

        import dicomnet

        result = ClientResult(0.0, 0, 0, 0.0)

        async def body(result: ClientResult) -> None:
            import anyio

            contexts = [dicomnet.PresentationContext(VERIFICATION)]
            before = server.sample()
            async with contextlib.AsyncExitStack() as stack:
                t0 = time.perf_counter()
                for _ in range(count):
                    try:
                        await stack.enter_async_context(
                            dicomnet.connect(
                                HOST, port, aet=SCU_AET, aec=self.aec, contexts=contexts
                            )
                        )
                    except dicomnet.DicomNetError as exc:
                        result.failed += 1
                        result.error(f"{type(exc).__name__}: {exc}")
                    else:
                        result.ok += 1
                result.seconds = time.perf_counter() - t0
                await anyio.sleep(1.0)
                held = server.sample()
                await anyio.sleep(IDLE_SECONDS)
                after = server.sample()
                t1 = time.perf_counter()
                try:
                    async with dicomnet.connect(
                        HOST, port, aet=SCU_AET, aec=self.aec, contexts=contexts
                    ) as assoc:
                        await assoc.echo()
                    result.extra["new_association_ms"] = (time.perf_counter() - t1) * 1000
                except dicomnet.DicomNetError as exc:
                    result.error(f"new association meanwhile: {type(exc).__name__}: {exc}")
                if result.ok:
                    per = (held.rss_kib - before.rss_kib) / result.ok
                    result.extra["kib_per_association"] = per
                result.extra["idle_cpu_percent"] = (
                    (after.cpu_seconds - held.cpu_seconds) / IDLE_SECONDS * 100
                )
                result.extra["scp_threads"] = float(held.threads)
                result.extra["scp_rss_held_mib"] = held.rss_kib / 1024
                cpu_held = time.process_time()
            result.extra["scu_cpu_idle_s"] = time.process_time() - cpu_held

        # The timer of `_run` covers opening, idling and closing: keep only the opening.
        run = self._run(body, timeout, result)
        run.seconds = result.seconds
        return run

    def _run(
        self,
        body: Callable[[ClientResult], Awaitable[None]],
        timeout: float,
        result: ClientResult | None = None,
    ) -> ClientResult:
        import anyio

        from benchmarks.find_scp import backend_options

        result = result if result is not None else ClientResult(0.0, 0, 0, 0.0)

        async def main() -> None:
            with anyio.fail_after(timeout):
                await body(result)

        cpu0, t0 = time.process_time(), time.perf_counter()
        try:
            anyio.run(main, backend_options=backend_options(self.loop))
        except TimeoutError:
            result.error(f"timed out after {timeout:g} s")
        if result.seconds == 0.0:
            result.seconds = time.perf_counter() - t0
        result.cpu_seconds = time.process_time() - cpu0
        return result


class PynetdicomSCU:
    """pynetdicom's AE in this process, as shipped (its own threads, Nagle on)."""

    key = "pynetdicom"
    label = "pynetdicom (in-process API)"

    def __init__(self, aec: str = "ANY-SCP") -> None:
        self.aec = aec

    def _ae(self, contexts: Sequence[tuple[str, Sequence[str] | None]], timeout: float) -> Any:
        from pynetdicom import AE

        ae = AE(ae_title=SCU_AET)
        for abstract, syntaxes in contexts:
            if syntaxes is None:
                ae.add_requested_context(abstract)
            else:
                ae.add_requested_context(abstract, list(syntaxes))
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.network_timeout = timeout
        return ae

    def echo_associations(self, port: int, count: int, timeout: float) -> ClientResult:
        ae = self._ae([(VERIFICATION, None)], 30.0)
        result = ClientResult(0.0, 0, 0, 0.0)
        deadline = time.monotonic() + timeout
        cpu0, t0 = time.process_time(), time.perf_counter()
        for _ in range(count):
            if time.monotonic() > deadline:
                result.failed += count - result.ok - result.failed
                result.error(f"timed out after {timeout:g} s")
                break
            assoc = ae.associate(HOST, port, ae_title=self.aec)
            if not assoc.is_established:
                result.failed += 1
                result.error("association not established")
                continue
            status = assoc.send_c_echo()
            self._tally(result, status, "C-ECHO")
            assoc.release()
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = time.process_time() - cpu0
        return result

    def echo_one(self, port: int, count: int, timeout: float) -> ClientResult:
        ae = self._ae([(VERIFICATION, None)], 30.0)
        return self._one_association(
            ae, port, count, timeout, lambda assoc, _i: assoc.send_c_echo(), "C-ECHO"
        )

    def store_one(self, port: int, instances: InstanceSet, timeout: float) -> ClientResult:
        ae = self._ae([(instances.sop_class_uid, [EXPLICIT_VR_LE])], 30.0)
        files = instances.files
        return self._one_association(
            ae,
            port,
            len(files),
            timeout,
            lambda assoc, i: assoc.send_c_store(files[i]),
            "C-STORE",
        )

    def _one_association(
        self,
        ae: Any,
        port: int,
        count: int,
        timeout: float,
        operation: Callable[[Any, int], object],
        name: str,
    ) -> ClientResult:
        result = ClientResult(0.0, 0, 0, 0.0)
        deadline = time.monotonic() + timeout
        cpu0, t0 = time.process_time(), time.perf_counter()
        assoc = ae.associate(HOST, port, ae_title=self.aec)
        if not assoc.is_established:
            result.failed = count
            result.error("association not established")
        else:
            try:
                for i in range(count):
                    if time.monotonic() > deadline:
                        result.failed += count - i
                        result.error(f"timed out after {timeout:g} s")
                        break
                    self._tally(result, operation(assoc, i), name)
                    if not assoc.is_established:
                        result.failed += count - i - 1
                        result.error("association ended early")
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = time.process_time() - cpu0
        return result

    def store_concurrent(
        self, port: int, parts: Sequence[InstanceSet], timeout: float
    ) -> ClientResult:
        """One thread per part, each with its own AE: associate, C-STORE its files, release;
        all threads started at once. Timed from the first start to the last join."""
        result = ClientResult(0.0, 0, 0, 0.0)
        lock = threading.Lock()
        deadline = time.monotonic() + timeout

        def worker(part: InstanceSet) -> None:
            ae = self._ae([(part.sop_class_uid, [EXPLICIT_VR_LE])], 30.0)
            sub = self._one_association(
                ae,
                port,
                len(part.files),
                max(1.0, deadline - time.monotonic()),
                lambda assoc, i: assoc.send_c_store(part.files[i]),
                "C-STORE",
            )
            with lock:
                result.ok += sub.ok
                result.failed += sub.failed
                for e in sub.errors:
                    result.error(e)

        threads = [threading.Thread(target=worker, args=(p,), daemon=True) for p in parts]
        cpu0, t0 = time.process_time(), time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()) + 30.0)
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = time.process_time() - cpu0
        if any(t.is_alive() for t in threads):
            result.error("some threads did not finish in time (left running, daemon)")
        return result

    def find(self, port: int, count: int, timeout: float) -> ClientResult:
        """`send_c_find` with the Patient Root model; every pending response counted."""
        from pydicom.dataset import Dataset

        ae = self._ae([(PATIENT_ROOT_FIND, None)], 60.0)
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientID = ""
        query.PatientName = ""
        result = ClientResult(0.0, 0, 0, 0.0)
        deadline = time.monotonic() + timeout
        cpu0, t0 = time.process_time(), time.perf_counter()
        assoc = ae.associate(HOST, port, ae_title=self.aec)
        matches = 0
        if not assoc.is_established:
            result.error("association not established")
        else:
            try:
                for status, _identifier in assoc.send_c_find(query, PATIENT_ROOT_FIND):
                    code = getattr(status, "Status", None)
                    if code in (0xFF00, 0xFF01):
                        matches += 1
                    elif code != 0x0000:
                        result.error(f"C-FIND: status {code!r}")
                    if time.monotonic() > deadline:
                        result.error(f"timed out after {timeout:g} s")
                        break
            finally:
                if assoc.is_established:
                    assoc.release()
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = time.process_time() - cpu0
        result.ok = min(matches, count)
        result.failed = count - result.ok
        if matches != count:
            result.error(f"{matches} matches received, {count} expected")
        return result

    def idle(self, port: int, count: int, timeout: float, server: ServerProcess) -> ClientResult:
        raise _unsupported(self, "S8")

    @staticmethod
    def _tally(result: ClientResult, status: object, name: str) -> None:
        code = getattr(status, "Status", None)
        if code is None:
            result.failed += 1
            result.error(f"{name}: no response (timeout, abort or invalid response)")
        elif code == 0x0000 or (0xB000 <= code <= 0xBFFF):
            result.ok += 1
        else:
            result.failed += 1
            result.error(f"{name}: status 0x{code:04X}")


class DcmtkSCU:
    """DCMTK's echoscu / storescu, timed as wall time of the command(s)."""

    key = "dcmtk"

    def __init__(self, *, nodelay: bool = True, aec: str = "ANY-SCP", tls: bool = False) -> None:
        self.nodelay = nodelay
        self.aec = aec
        self.label = "DCMTK echoscu/storescu" + ("" if nodelay else " (Nagle on)")
        if not nodelay:
            self.key = "dcmtk-nagle"
        self.env: Mapping[str, str] = _base_env(nodelay=nodelay)
        # TLS (S2, S4, S5 only): `+tls KEY CERT +cf CA`, DCMTK's default BCP 195 profile.
        self.tls_args: list[str] = []
        if tls:
            certs = pki()
            self.tls_args = ["+tls", str(certs.client_key), str(certs.client_cert)]
            self.tls_args += ["+cf", str(certs.ca)]
            self.key = "dcmtk-tls"
            self.label += " +tls"

    def _command(
        self, argv: list[str], timeout: float, result: ClientResult, ok: int, failed: int
    ) -> None:
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                env=dict(self.env),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            result.failed += failed
            result.error(f"{argv[0]} timed out after {timeout:g} s")
            return
        if proc.returncode == 0:
            result.ok += ok
        else:
            result.failed += failed
            text = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip()
            result.error(f"{argv[0]} exit {proc.returncode}: {text[-500:]}")

    def echo_associations(self, port: int, count: int, timeout: float) -> ClientResult:
        result = ClientResult(0.0, 0, 0, 0.0)
        argv = [dcmtk("echoscu"), "-aet", SCU_AET, "-aec", self.aec, HOST, str(port)]
        deadline = time.monotonic() + timeout
        cpu0, t0 = _children_cpu(), time.perf_counter()
        for _ in range(count):
            left = deadline - time.monotonic()
            if left <= 0:
                result.failed += count - result.ok - result.failed
                result.error(f"timed out after {timeout:g} s")
                break
            self._command(argv, min(left, 30.0), result, 1, 1)
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        return result

    def echo_one(self, port: int, count: int, timeout: float) -> ClientResult:
        result = ClientResult(0.0, 0, 0, 0.0)
        argv = [dcmtk("echoscu"), "--repeat", str(count), "-aet", SCU_AET, "-aec", self.aec]
        argv += [*self.tls_args, HOST, str(port)]
        cpu0, t0 = _children_cpu(), time.perf_counter()
        self._command(argv, timeout, result, count, count)
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        return result

    def store_one(self, port: int, instances: InstanceSet, timeout: float) -> ClientResult:
        result = ClientResult(0.0, 0, 0, 0.0)
        n = len(instances.files)
        argv = [dcmtk("storescu"), "+sd", "-aet", SCU_AET, "-aec", self.aec, *self.tls_args]
        argv += [HOST, str(port), str(instances.folder)]
        cpu0, t0 = _children_cpu(), time.perf_counter()
        self._command(argv, timeout, result, n, n)
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        return result

    def store_concurrent(
        self, port: int, parts: Sequence[InstanceSet], timeout: float
    ) -> ClientResult:
        """One `storescu +sd FOLDER` process per part, all started at once; wall time from
        the first start to the last exit (so process start-up is inside it)."""
        result = ClientResult(0.0, 0, 0, 0.0)
        argv = [dcmtk("storescu"), "+sd", "-aet", SCU_AET, "-aec", self.aec, HOST, str(port)]
        procs: list[subprocess.Popen[bytes]] = []
        cpu0, t0 = _children_cpu(), time.perf_counter()
        deadline = time.monotonic() + timeout
        try:
            for part in parts:
                procs.append(
                    subprocess.Popen(
                        [*argv, str(part.folder)],
                        stdin=subprocess.DEVNULL,
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.PIPE,
                        env=dict(self.env),
                    )
                )
            for proc, part in zip(procs, parts, strict=False):
                try:
                    _, err = proc.communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    result.failed += len(part.files)
                    result.error(f"storescu timed out after {timeout:g} s")
                    continue
                if proc.returncode == 0:
                    result.ok += len(part.files)
                else:
                    result.failed += len(part.files)
                    text = err.decode("utf-8", "replace").strip()
                    result.error(f"storescu exit {proc.returncode}: {text[-300:]}")
        finally:
            _kill_all(procs)
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        return result

    def find(self, port: int, count: int, timeout: float) -> ClientResult:
        """`findscu -P -k QueryRetrieveLevel=PATIENT -k PatientID -k PatientName`, timed
        as the whole command. findscu logs every response (at its default level, to
        stdout/stderr): the "Find Response" lines are counted."""
        result = ClientResult(0.0, 0, 0, 0.0)
        argv = [dcmtk("findscu"), "-P", "-aet", SCU_AET, "-aec", self.aec]
        argv += ["-k", "QueryRetrieveLevel=PATIENT", "-k", "PatientID", "-k", "PatientName"]
        argv += [HOST, str(port)]
        cpu0, t0 = _children_cpu(), time.perf_counter()
        try:
            proc = subprocess.run(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=dict(self.env),
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            result.failed = count
            result.error(f"findscu timed out after {timeout:g} s")
            result.seconds = time.perf_counter() - t0
            return result
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        text = proc.stdout.decode("utf-8", "replace")
        matches = sum(
            1 for line in text.splitlines() if "Find Response" in line and "Pending" in line
        )
        result.ok = min(matches, count)
        result.failed = count - result.ok
        if proc.returncode != 0:
            result.error(f"findscu exit {proc.returncode}: {text.strip()[-300:]}")
        if matches != count:
            result.error(f"{matches} matches received, {count} expected")
        return result

    def idle(self, port: int, count: int, timeout: float, server: ServerProcess) -> ClientResult:
        raise _unsupported(self, "S8")


def dcmtk_version() -> str:
    exe = shutil.which(dcmtk("echoscu"))
    if exe is None:
        return "not installed"
    out = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for line in out.splitlines():
        if "echoscu v" in line:
            return line.split("echoscu ", 1)[1].strip(" $")
    return out.strip().splitlines()[0] if out.strip() else "unknown"
