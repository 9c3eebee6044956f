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

import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from benchmarks.data import InstanceSet
from benchmarks.procs import HOST

REPO_ROOT = Path(__file__).resolve().parents[1]
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
SCU_AET = "BENCHSCU"
MAX_ERRORS_KEPT = 5


# --- results -------------------------------------------------------------------------------


@dataclass(slots=True)
class ClientResult:
    """What one SCU run did: elapsed seconds, operations that succeeded or failed."""

    seconds: float
    ok: int
    failed: int
    cpu_seconds: float
    errors: list[str] = field(default_factory=list)

    def error(self, text: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(text)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


# --- SCPs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SCPSpec:
    """How to start one SCP: its argv and environment for a port and a storage folder."""

    key: str
    label: str
    durability: str
    build: Callable[[int, Path], tuple[list[str], dict[str, str]]]

    def command(self, port: int, storage: Path) -> tuple[list[str], dict[str, str]]:
        return self.build(port, storage)


def _base_env(*, nodelay: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        # DCMTK >= 3.6.2 leaves Nagle's algorithm on unless TCP_NODELAY is set (envvars.txt).
        env["TCP_NODELAY"] = "1"
    return env


def dicomnet_scp(*, fsync: bool) -> SCPSpec:
    def build(port: int, storage: Path) -> tuple[list[str], dict[str, str]]:
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
        return argv, _base_env(nodelay=False)

    # `dicomnet serve` also records every instance in its SQLite index (Q/R), before the
    # response: the file is re-read up to the pixel data, one commit (WAL, synchronous=NORMAL).
    index = "; indexed in SQLite in the background, in batches (WAL, no fsync per commit)"
    if fsync:
        return SCPSpec(
            "dicomnet-fsync",
            "dicomnet serve",
            "temp file, fsync, atomic rename, fsync of the folder" + index,
            build,
        )
    return SCPSpec(
        "dicomnet-nofsync",
        "dicomnet serve --no-fsync",
        "temp file, atomic rename, no fsync (page cache)" + index,
        build,
    )


def pynetdicom_scp() -> SCPSpec:
    def build(port: int, storage: Path) -> tuple[list[str], dict[str, str]]:
        argv = [
            sys.executable,
            "-m",
            "benchmarks.pynetdicom_scp",
            "--port",
            str(port),
            "--storage",
            str(storage),
        ]
        return argv, _base_env(nodelay=False)

    return SCPSpec(
        "pynetdicom",
        "pynetdicom AE (encoded_dataset() to file)",
        "plain write, no fsync (page cache)",
        build,
    )


def storescp_scp(*, nodelay: bool = True) -> SCPSpec:
    def build(port: int, storage: Path) -> tuple[list[str], dict[str, str]]:
        argv = ["storescp", "+B", "-od", str(storage), "-aet", "STORESCP", str(port)]
        return argv, _base_env(nodelay=nodelay)

    label = "storescp +B" + ("" if nodelay else " (Nagle on)")
    key = "storescp" if nodelay else "storescp-nagle"
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


class DicomnetSCU:
    """dicomnet's Python API in this process (anyio on asyncio)."""

    key = "dicomnet"
    label = "dicomnet (in-process API)"

    def __init__(self, aec: str = "ANY-SCP") -> None:
        self.aec = aec

    def echo_associations(self, port: int, count: int, timeout: float) -> ClientResult:
        import dicomnet

        async def body(result: ClientResult) -> None:
            contexts = [dicomnet.PresentationContext(VERIFICATION)]
            for _ in range(count):
                try:
                    async with dicomnet.connect(
                        HOST, port, aet=SCU_AET, aec=self.aec, contexts=contexts
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
                    HOST, port, aet=SCU_AET, aec=self.aec, contexts=contexts
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
                    HOST, port, aet=SCU_AET, aec=self.aec, contexts=contexts
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

    @staticmethod
    def _run(body: Callable[[ClientResult], Awaitable[None]], timeout: float) -> ClientResult:
        import anyio

        result = ClientResult(0.0, 0, 0, 0.0)

        async def main() -> None:
            with anyio.fail_after(timeout):
                await body(result)

        cpu0, t0 = time.process_time(), time.perf_counter()
        try:
            anyio.run(main)
        except TimeoutError:
            result.error(f"timed out after {timeout:g} s")
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

    def __init__(self, *, nodelay: bool = True, aec: str = "ANY-SCP") -> None:
        self.nodelay = nodelay
        self.aec = aec
        self.label = "DCMTK echoscu/storescu" + ("" if nodelay else " (Nagle on)")
        if not nodelay:
            self.key = "dcmtk-nagle"
        self.env: Mapping[str, str] = _base_env(nodelay=nodelay)

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
        argv = ["echoscu", "-aet", SCU_AET, "-aec", self.aec, HOST, str(port)]
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
        argv = ["echoscu", "--repeat", str(count), "-aet", SCU_AET, "-aec", self.aec]
        argv += [HOST, str(port)]
        cpu0, t0 = _children_cpu(), time.perf_counter()
        self._command(argv, timeout, result, count, count)
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        return result

    def store_one(self, port: int, instances: InstanceSet, timeout: float) -> ClientResult:
        result = ClientResult(0.0, 0, 0, 0.0)
        n = len(instances.files)
        argv = ["storescu", "+sd", "-aet", SCU_AET, "-aec", self.aec, HOST, str(port)]
        argv.append(str(instances.folder))
        cpu0, t0 = _children_cpu(), time.perf_counter()
        self._command(argv, timeout, result, n, n)
        result.seconds = time.perf_counter() - t0
        result.cpu_seconds = _children_cpu() - cpu0
        return result


def dcmtk_version() -> str:
    exe = shutil.which("echoscu")
    if exe is None:
        return "not installed"
    out = subprocess.run(
        [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
    ).stdout
    for line in out.splitlines():
        if "echoscu v" in line:
            return line.split("echoscu ", 1)[1].strip(" $")
    return out.strip().splitlines()[0] if out.strip() else "unknown"
