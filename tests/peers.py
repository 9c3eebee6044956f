"""Real peers for the end-to-end tests, and the helpers to judge what they did.

- free ports, subprocess servers with a bounded readiness wait (the listening
  socket must belong to the process we started) and a sure stop;
- ``dicomnet serve`` and DCMTK ``storescp`` as servers, ``echoscu``,
  ``storescu`` and the ``dicomnet`` CLI as clients;
- a pynetdicom storage SCP in a thread, pynetdicom echo / store helpers;
- a raw-socket DICOM Upper Layer client (A-ASSOCIATE, P-DATA, A-RELEASE,
  A-ABORT written by hand) for the robustness tests;
- Part-10 parsing (file meta, byte offset of the data set) and byte-exact data
  set comparisons.

Everything talks to 127.0.0.1 only. Nothing here imports dicomnet: the
implementation is exercised only through its command line and the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info

HOST = "127.0.0.1"
DICOMNET_AET = "DICOMNET"  # the documented default of `dicomnet serve --aet`
REPO_ROOT = Path(__file__).resolve().parents[1]
DCMTK_TOOLS = ("echoscu", "storescu", "storescp")

VERIFICATION = "1.2.840.10008.1.1"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


_dcmtk_cache: dict[str, str | None] = {}


def dcmtk_tool(name: str) -> str | None:
    """Absolute path of DCMTK's ``name``, or None.

    pynetdicom installs Python apps called echoscu / storescu / storescp into the
    venv's bin folder, which comes first on PATH in an activated venv: every
    candidate on PATH (after ``$DCMTK_BIN`` when set) is asked for ``--version``
    and only one that answers as DCMTK is used.
    """
    if name in _dcmtk_cache:
        return _dcmtk_cache[name]
    dirs = os.environ.get("PATH", "").split(os.pathsep)
    if os.environ.get("DCMTK_BIN"):
        dirs.insert(0, os.environ["DCMTK_BIN"])
    found: str | None = None
    for d in dirs:
        candidate = shutil.which(name, path=d) if d else None
        if candidate is None:
            continue
        try:
            r = subprocess.run(
                [candidate, "--version"],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if "$dcmtk:" in r.stdout + r.stderr:
            found = os.path.abspath(candidate)
            break
    _dcmtk_cache[name] = found
    return found


def _dcmtk(name: str) -> str:
    path = dcmtk_tool(name)
    if path is None:
        raise FileNotFoundError(f"DCMTK {name} not found on PATH")
    return path


def dcmtk_missing() -> list[str]:
    return [tool for tool in DCMTK_TOOLS if dcmtk_tool(tool) is None]


# --------------------------------------------------------------------------
# ports and processes


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening_inodes(port: int) -> set[str] | None:
    """Inodes of the sockets in LISTEN state on ``port``, or None without /proc."""
    found: set[str] = set()
    seen_table = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        seen_table = True
        for line in lines:
            parts = line.split()
            if len(parts) < 10:
                continue
            local, state, inode = parts[1], parts[3], parts[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                found.add(inode)
    return found if seen_table else None


def _socket_inodes_of(pid: int) -> set[str] | None:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return None
    inodes: set[str] = set()
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def is_listening(port: int, pid: int | None = None) -> bool:
    """Whether ``port`` is in LISTEN state (owned by ``pid`` when it is given).

    Uses /proc (no connection is made, so a server's association counters and
    logs are not disturbed); falls back to a TCP connect elsewhere.
    """
    inodes = _listening_inodes(port)
    if inodes is None:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            return False
    if not inodes:
        return False
    if pid is None:
        return True
    owned = _socket_inodes_of(pid)
    return True if owned is None else bool(inodes & owned)


class ServerStartError(AssertionError):
    pass


class ManagedProcess:
    """A subprocess whose stdout+stderr go to a log file, stopped for sure."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"$ {' '.join(self.argv)}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_text(self, tail: int | None = 20_000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "<no log>"
        if tail is not None and len(data) > tail:
            data = b"[...]\n" + data[-tail:]
        return data.decode("utf-8", "replace")

    def wait_listening(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerStartError(
                    f"{self.name} exited with {self.returncode} before listening on "
                    f"port {port}.\ncommand: {' '.join(self.argv)}\n--- log ---\n"
                    f"{self.log_text()}"
                )
            if is_listening(port, self.pid):
                return
            time.sleep(0.05)
        raise ServerStartError(
            f"{self.name} not listening on port {port} after {timeout} s.\n"
            f"command: {' '.join(self.argv)}\n--- log ---\n{self.log_text()}"
        )

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(timeout)
        return self.proc.returncode


def start_listening_process(
    name: str,
    make_argv: Callable[[int], Sequence[str]],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 20.0,
    attempts: int = 3,
) -> tuple[ManagedProcess, int]:
    """Start ``make_argv(port)`` on a free port; retry on a port lost to a race."""
    last: Exception | None = None
    for _ in range(attempts):
        port = free_port()
        proc = ManagedProcess(name, make_argv(port), log_path, env=env, cwd=cwd).start()
        try:
            proc.wait_listening(port, timeout)
            return proc, port
        except ServerStartError as exc:
            proc.stop()
            last = exc
            if "in use" not in proc.log_text().lower():
                raise
    assert last is not None
    raise last


# --------------------------------------------------------------------------
# dicomnet serve and the dicomnet command line


def dicomnet_env(tmpdir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    # Running from the repository root must work with or without `pip install -e`.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    if tmpdir is not None:
        # A private temp dir: whatever the server leaves in it is observable.
        tmpdir.mkdir(parents=True, exist_ok=True)
        env["TMPDIR"] = env["TEMP"] = env["TMP"] = str(tmpdir)
    return env


@dataclass
class DicomnetServer:
    process: ManagedProcess
    port: int
    storage: Path
    tmpdir: Path
    aet: str | None
    host: str = HOST

    def alive(self) -> bool:
        return self.process.alive()

    def log_text(self, tail: int | None = 20_000) -> str:
        return self.process.log_text(tail)

    def stop(self) -> int | None:
        return self.process.stop()

    def files(self) -> set[Path]:
        return all_files(self.storage)

    def stored(self) -> dict[str, Path]:
        """SOP Instance UID -> path, for every ``*.dcm`` under the storage folder."""
        out: dict[str, Path] = {}
        for path in sorted(self.storage.rglob("*.dcm")):
            uid = path.name[: -len(".dcm")]
            assert uid not in out, f"{uid} stored twice: {out[uid]} and {path}"
            out[uid] = path
        return out

    def wait_stored(self, uids: Iterable[str], timeout: float = 10.0) -> dict[str, Path]:
        """Wait (bounded) until every UID in ``uids`` has a ``.dcm`` file."""
        wanted = set(uids)
        deadline = time.monotonic() + timeout
        while True:
            stored = self.stored()
            if wanted <= stored.keys() or time.monotonic() > deadline:
                return stored
            time.sleep(0.05)


def start_dicomnet_server(
    workdir: Path,
    *,
    aet: str | None = None,
    allow: Sequence[str] = (),
    max_associations: int | None = None,
    extra_args: Sequence[str] = (),
    verbose: bool = True,
    timeout: float = 30.0,
) -> DicomnetServer:
    workdir.mkdir(parents=True, exist_ok=True)
    storage = workdir / "storage"
    storage.mkdir(exist_ok=True)
    tmpdir = workdir / "server-tmp"
    env = dicomnet_env(tmpdir)

    def argv(port: int) -> list[str]:
        cmd = [*dicomnet_command(), "serve", "--host", HOST, "--port", str(port)]
        cmd += ["--storage", str(storage)]
        if aet is not None:
            cmd += ["--aet", aet]
        for a in allow:
            cmd += ["--allow", a]
        if max_associations is not None:
            cmd += ["--max-associations", str(max_associations)]
        if verbose:
            cmd.append("-v")
        cmd += list(extra_args)
        return cmd

    proc, port = start_listening_process(
        "dicomnet serve",
        argv,
        workdir / "dicomnet-serve.log",
        env=env,
        cwd=REPO_ROOT,
        timeout=timeout,
    )
    return DicomnetServer(process=proc, port=port, storage=storage, tmpdir=tmpdir, aet=aet)


def dicomnet_command() -> list[str]:
    """How to run the CLI: ``python -m dicomnet`` with this interpreter, unless
    ``DICOMNET_TEST_CLI`` names another command (e.g. ``dicomnet``, the console
    script), split on whitespace."""
    override = os.environ.get("DICOMNET_TEST_CLI", "").split()
    return override or [sys.executable, "-m", "dicomnet"]


def run_dicomnet(
    args: Sequence[object], *, timeout: float = 120.0, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m dicomnet ARGS`` with stdout and stderr captured (not a terminal)."""
    return subprocess.run(
        [*dicomnet_command(), *map(str, args)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dicomnet_env(),
        cwd=cwd or REPO_ROOT,
    )


def describe_cli(result: subprocess.CompletedProcess[str]) -> str:
    """A finished CLI run, for assertion messages."""
    return (
        f"$ {' '.join(map(str, result.args))}\n(exit {result.returncode})\n"
        f"--- stdout ---\n{result.stdout[-10_000:]}\n--- stderr ---\n{result.stderr[-10_000:]}"
    )


# --------------------------------------------------------------------------
# DCMTK


@dataclass
class StoreSCP:
    """DCMTK storescp, bit-preserving (+B), accepting every transfer syntax (+xa)."""

    process: ManagedProcess
    port: int
    out_dir: Path
    aet: str
    host: str = HOST

    def alive(self) -> bool:
        return self.process.alive()

    def log_text(self, tail: int | None = 20_000) -> str:
        return self.process.log_text(tail)

    def stop(self) -> int | None:
        return self.process.stop()

    def received(self) -> dict[str, Path]:
        return index_part10_tree(self.out_dir)

    def wait_received(self, count: int, timeout: float = 10.0) -> dict[str, Path]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.received()
            if len(got) >= count or time.monotonic() > deadline:
                return got
            time.sleep(0.05)


def start_storescp(
    workdir: Path,
    *,
    aet: str = "STORESCP",
    extra_args: Sequence[str] = (),
    accept_all: bool = True,
    port: int | None = None,
    timeout: float = 20.0,
) -> StoreSCP:
    """storescp bit-preserving; with `accept_all` (+xa) every transfer syntax, else its
    default: the uncompressed ones only. `port`: this one, else a free one."""
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = workdir / "received"
    out_dir.mkdir(exist_ok=True)

    def argv(port: int) -> list[str]:
        return [
            _dcmtk("storescp"), "-v", "-dhl", "+B", *(["+xa"] if accept_all else []), "-pm",
            "-ta", "30", "-od", str(out_dir), "-aet", aet, *extra_args, str(port),
        ]  # fmt: skip

    if port is not None:
        proc = ManagedProcess("storescp", argv(port), workdir / "storescp.log").start()
        proc.wait_listening(port, timeout)
        return StoreSCP(process=proc, port=port, out_dir=out_dir, aet=aet)
    proc, port = start_listening_process(
        "storescp", argv, workdir / "storescp.log", timeout=timeout
    )
    return StoreSCP(process=proc, port=port, out_dir=out_dir, aet=aet)


@dataclass
class ToolResult:
    argv: list[str]
    returncode: int
    output: str  # stdout and stderr, interleaved

    def __str__(self) -> str:
        return f"$ {' '.join(self.argv)}\n(exit {self.returncode})\n{self.output[-20_000:]}"


def run_tool(argv: Sequence[str], *, timeout: float = 120.0) -> ToolResult:
    argv = [str(a) for a in argv]
    r = subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=timeout,
    )
    return ToolResult(argv, r.returncode, r.stdout.decode("utf-8", "replace"))


def echoscu(
    port: int,
    *,
    aet: str = "ECHOSCU",
    aec: str = "ANY-SCP",
    extra_args: Sequence[str] = (),
    timeout: float = 60.0,
) -> ToolResult:
    return run_tool(
        [_dcmtk("echoscu"), "-v", "-to", "10", "-ta", "10", "-td", "20", "-aet", aet, "-aec", aec,
         *extra_args, HOST, str(port)],
        timeout=timeout,
    )  # fmt: skip


def write_storescu_config(
    pairs: Iterable[tuple[str, str]], path: Path, profile: str = "Corpus"
) -> tuple[Path, str]:
    """A storescu association profile with one presentation context per (SOP class,
    transfer syntax) pair, each proposing that single transfer syntax.

    storescu looks for an accepted context with the file's own transfer syntax
    first, so each file is sent in its own encoding, never converted.
    """
    pairs = sorted(set(pairs))
    if len(pairs) > 128:
        raise ValueError(f"{len(pairs)} presentation contexts, more than 128")
    syntaxes = sorted({ts for _, ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(syntaxes):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", f"[{profile}Contexts]"]
    for n, (sop, ts) in enumerate(pairs, 1):
        lines.append(f"PresentationContext{n} = {sop}\\TS{syntaxes.index(ts)}")
    lines += ["[[Profiles]]", f"[{profile}]", f"PresentationContexts = {profile}Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return path, profile


def storescu(
    port: int,
    paths: Sequence[Path],
    *,
    config: tuple[Path, str] | None = None,
    aet: str = "STORESCU",
    aec: str = "ANY-SCP",
    extra_args: Sequence[str] = (),
    timeout: float = 300.0,
) -> ToolResult:
    """storescu, scanning folders recursively, not halting on a failed store."""
    argv = [_dcmtk("storescu"), "-v", "-to", "10", "-ta", "30", "-td", "120", "-nh", "+sd", "+r"]
    if config is not None:
        argv += ["-xf", str(config[0]), config[1]]
    argv += ["-aet", aet, "-aec", aec, *extra_args, HOST, str(port), *map(str, paths)]
    return run_tool(argv, timeout=timeout)


# --------------------------------------------------------------------------
# Part-10 files and data set comparison

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT",
             b"UV"}  # fmt: skip


def split_part10(path: Path) -> tuple[Dataset, int]:
    """The file meta information of a Part-10 file and the byte offset of its data set.

    The offset is found by walking the group 0002 elements (explicit VR LE) after
    the preamble; when (0002,0000) File Meta Information Group Length is present,
    it must agree.
    """
    with open(path, "rb") as fp:
        head = fp.read(132)
        if len(head) != 132 or head[128:132] != b"DICM":
            raise ValueError(f"{path}: not a Part-10 file (no DICM prefix)")
        offset = 132
        group_length: int | None = None
        while True:
            fp.seek(offset)
            hdr = fp.read(8)
            if len(hdr) < 8:
                break
            group, elem = struct.unpack("<HH", hdr[:4])
            if group != 0x0002:
                break
            vr = hdr[4:6]
            if vr in _LONG_VRS:
                ext = fp.read(4)
                if len(ext) < 4:
                    raise ValueError(f"{path}: truncated file meta")
                length = struct.unpack("<I", ext)[0]
                header = 12
            else:
                length = struct.unpack("<H", hdr[6:8])[0]
                header = 8
            if elem == 0x0000 and length == 4:
                group_length = struct.unpack("<I", fp.read(4))[0]
            offset += header + length
    if group_length is not None and 132 + 12 + group_length != offset:
        raise ValueError(
            f"{path}: group length says the meta ends at {132 + 12 + group_length}, "
            f"its elements end at {offset}"
        )
    meta = read_file_meta_info(path)
    return meta, offset


def read_part10(path: Path) -> tuple[Dataset, bytes]:
    """(file meta, data set bytes): everything after group 0002, as stored."""
    meta, offset = split_part10(path)
    with open(path, "rb") as fp:
        fp.seek(offset)
        return meta, fp.read()


def dataset_bytes(path: Path) -> bytes:
    return read_part10(path)[1]


def dataset_sha256(path: Path) -> str:
    _, offset = split_part10(path)
    h = hashlib.sha256()
    with open(path, "rb") as fp:
        fp.seek(offset)
        for chunk in iter(lambda: fp.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def describe_difference(expected: bytes, actual: bytes, context: int = 16) -> str | None:
    """None when equal, otherwise where and how the two byte strings differ."""
    if expected == actual:
        return None
    n = min(len(expected), len(actual))
    first = next((i for i in range(n) if expected[i] != actual[i]), n)
    lo = max(0, first - context)
    return (
        f"lengths expected={len(expected)} actual={len(actual)}; first difference at "
        f"offset {first}: expected[{lo}:]={expected[lo : first + context].hex(' ')} "
        f"actual[{lo}:]={actual[lo : first + context].hex(' ')}"
    )


def compare_dataset_files(expected: Path, actual: Path) -> str | None:
    """None when the data sets (bytes after group 0002) of two Part-10 files are equal."""
    return describe_difference(dataset_bytes(expected), dataset_bytes(actual))


def all_files(root: Path) -> set[Path]:
    """Every non-directory entry under ``root`` (hidden files and symlinks included)."""
    out: set[Path] = set()
    if not root.exists():
        return out
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            out.add(Path(dirpath) / name)
    return out


def index_part10_tree(root: Path) -> dict[str, Path]:
    """Media Storage SOP Instance UID -> path for every Part-10 file under ``root``."""
    out: dict[str, Path] = {}
    for path in sorted(all_files(root)):
        try:
            meta = read_file_meta_info(path)
        except Exception:
            continue  # a partial file being written, or not DICOM
        uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
        if not uid:
            continue
        assert uid not in out, f"{uid} received twice: {out[uid]} and {path}"
        out[uid] = path
    return out


# --------------------------------------------------------------------------
# pynetdicom


def pynetdicom_ae(aet: str = "PYNETSCU") -> Any:
    """A pynetdicom AE with bounded timeouts (no context added yet)."""
    from pynetdicom import AE

    ae = AE(ae_title=aet)
    ae.acse_timeout = 15
    ae.dimse_timeout = 120
    ae.network_timeout = 120
    ae.connection_timeout = 10
    return ae


@dataclass
class EchoOutcome:
    established: bool
    rejected: bool
    aborted: bool
    status: int | None


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# pynetdicom's reactor thread can take a response off the queue before `send_c_echo`
# waits for it (pydicom/pynetdicom#875): it logs this and the call waits out its timeout.
_PYNETDICOM_DROPPED = "Received unexpected C-ECHO service message"
ECHO_TIMEOUT = 20.0  # seconds: a dropped response costs this, not the test's whole limit


def pynetdicom_send_echo(assoc: Any) -> Dataset:
    """`assoc.send_c_echo()`, sent once more only when pynetdicom itself says it received
    the response and dropped it (the race above): our answer did arrive then."""
    records = _Records()
    logger = logging.getLogger("pynetdicom")
    logger.addHandler(records)
    previous = assoc.dimse_timeout
    assoc.dimse_timeout = ECHO_TIMEOUT
    try:
        rsp: Dataset = assoc.send_c_echo()
        if "Status" not in rsp and assoc.is_established and _PYNETDICOM_DROPPED in records.messages:
            rsp = assoc.send_c_echo()
        return rsp
    finally:
        assoc.dimse_timeout = previous
        logger.removeHandler(records)


def pynetdicom_echo(port: int, *, aet: str = "PYNETDICOM", aec: str = "ANY-SCP") -> EchoOutcome:
    ae = pynetdicom_ae(aet)
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, port, ae_title=aec)
    status = None
    established = assoc.is_established
    if established:
        rsp = pynetdicom_send_echo(assoc)
        status = int(rsp.Status) if "Status" in rsp else None
        assoc.release()
    return EchoOutcome(established, assoc.is_rejected, assoc.is_aborted, status)


@contextlib.contextmanager
def pynetdicom_chunked_send() -> Iterator[None]:
    """Make pynetdicom send files from disk as-is (no decode / re-encode)."""
    from pynetdicom import _config

    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old


@dataclass
class ReceivedInstance:
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_aet: str
    path: Path  # the data set bytes exactly as received, nothing else


@dataclass
class PynetdicomSCP:
    """A pynetdicom storage + verification SCP in a background thread.

    Accepts every storage SOP class with every transfer syntax pynetdicom knows
    and writes each received data set's bytes, as received, to ``out_dir``.
    ``fail_uids`` maps SOP Instance UIDs to the status to answer instead of 0.
    """

    out_dir: Path
    aet: str = "PYNETSCP"
    port: int = 0
    fail_uids: dict[str, int] = field(default_factory=dict)
    received: dict[str, ReceivedInstance] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    _server: Any = None
    _count: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Any) -> int:
        try:
            req = event.request
            uid = str(req.AffectedSOPInstanceUID)
            data = event.encoded_dataset(include_meta=False)
            with self._lock:
                self._count += 1
                path = self.out_dir / f"{self._count:05d}.bin"
            path.write_bytes(data)
            with self._lock:
                if uid in self.received:
                    self.errors.append(f"{uid} received twice")
                self.received[uid] = ReceivedInstance(
                    sop_class_uid=str(req.AffectedSOPClassUID),
                    sop_instance_uid=uid,
                    transfer_syntax_uid=str(event.context.transfer_syntax),
                    calling_aet=str(event.assoc.requestor.ae_title),
                    path=path,
                )
            return self.fail_uids.get(uid, 0x0000)
        except Exception as exc:  # pragma: no cover - reported by the test
            self.errors.append(repr(exc))
            return 0xC000

    def start(self) -> PynetdicomSCP:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        ae = pynetdicom_ae(self.aet)
        ae.maximum_pdu_size = 0  # unlimited
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        last: Exception | None = None
        for _ in range(3):
            port = free_port()
            try:
                self._server = ae.start_server(
                    (HOST, port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
                )
                self.port = port
                return self
            except OSError as exc:
                last = exc
        assert last is not None
        raise last

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> PynetdicomSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: What the conftest fixtures of the same names hand to a test.
ServerFactory = Callable[..., DicomnetServer]
StoreSCPFactory = Callable[..., StoreSCP]
PynetdicomSCPFactory = Callable[..., PynetdicomSCP]


# --------------------------------------------------------------------------
# a raw DICOM Upper Layer client, for the robustness tests

PDU_ASSOCIATE_RQ = 0x01
PDU_ASSOCIATE_AC = 0x02
PDU_ASSOCIATE_RJ = 0x03
PDU_P_DATA_TF = 0x04
PDU_RELEASE_RQ = 0x05
PDU_RELEASE_RP = 0x06
PDU_ABORT = 0x07


def _ae_field(title: str) -> bytes:
    raw = title.encode("ascii")
    assert 0 < len(raw) <= 16
    return raw.ljust(16, b" ")


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBI", pdu_type, 0, len(body)) + body


def build_associate_rq(
    *,
    calling: str = "RAWSCU",
    called: str = "ANY-SCP",
    contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
    max_pdu: int = 16384,
) -> bytes:
    """An A-ASSOCIATE-RQ PDU; contexts are (odd id, abstract syntax, transfer syntaxes)."""
    body = struct.pack(">HH", 1, 0) + _ae_field(called) + _ae_field(calling) + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for cid, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode())
        for ts in syntaxes:
            sub += _item(0x40, ts.encode())
        body += _item(0x20, struct.pack(">BBBB", cid, 0, 0, 0) + sub)
    user = _item(0x51, struct.pack(">I", max_pdu))
    user += _item(0x52, b"1.2.826.0.1.3680043.9.7433.1.1")
    user += _item(0x55, b"RAW_TESTS")
    body += _item(0x50, user)
    return pdu(PDU_ASSOCIATE_RQ, body)


def read_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"timed out after {len(buf)} of {n} bytes")
        sock.settimeout(remaining)
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes]:
    deadline = time.monotonic() + timeout
    header = read_exact(sock, 6, deadline)
    pdu_type, _, length = struct.unpack(">BBI", header)
    if length > 64 * 1024 * 1024:
        raise ValueError(f"peer sent PDU type {pdu_type:#04x} claiming {length} bytes")
    return pdu_type, read_exact(sock, length, deadline)


@dataclass
class ConnectionEnd:
    """How a connection ended after we sent something bad."""

    data: bytes  # everything the server sent
    closed: bool  # EOF or reset seen within the time limit
    reset: bool
    seconds: float

    @property
    def ended(self) -> bool:
        """Closed by the server, or told to end (A-ABORT / A-ASSOCIATE-RJ)."""
        return self.closed or any(t in (PDU_ABORT, PDU_ASSOCIATE_RJ) for t in self.pdu_types())

    def pdu_types(self) -> list[int]:
        """Types of the complete PDUs in ``data`` (a trailing fragment is ignored)."""
        types: list[int] = []
        pos = 0
        while pos + 6 <= len(self.data):
            t, _, n = struct.unpack(">BBI", self.data[pos : pos + 6])
            if pos + 6 + n > len(self.data):
                break
            types.append(t)
            pos += 6 + n
        return types


def wait_connection_end(
    sock: socket.socket, timeout: float = 10.0, grace_after_abort: float = 1.0
) -> ConnectionEnd:
    """Read until the server closes the connection, or ``timeout`` passes.

    Once an A-ABORT or A-ASSOCIATE-RJ has arrived, wait at most
    ``grace_after_abort`` more seconds for the close: after sending A-ABORT a
    server may rightly wait (Sta13, ARTIM) for the requestor to close first.
    """
    start = time.monotonic()
    deadline = start + timeout
    data = bytearray()
    while True:
        if deadline > time.monotonic() + grace_after_abort and any(
            t in (PDU_ABORT, PDU_ASSOCIATE_RJ)
            for t in ConnectionEnd(bytes(data), False, False, 0).pdu_types()
        ):
            deadline = time.monotonic() + grace_after_abort
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return ConnectionEnd(bytes(data), False, False, time.monotonic() - start)
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return ConnectionEnd(bytes(data), True, True, time.monotonic() - start)
        if not chunk:
            return ConnectionEnd(bytes(data), True, False, time.monotonic() - start)
        data += chunk


@dataclass
class Rejection:
    result: int
    source: int
    reason: int


class AssociationRefused(Exception):
    def __init__(self, pdu_type: int, body: bytes) -> None:
        self.pdu_type = pdu_type
        self.body = body
        self.rejection: Rejection | None = None
        if pdu_type == PDU_ASSOCIATE_RJ and len(body) >= 4:
            self.rejection = Rejection(body[1], body[2], body[3])
        super().__init__(f"association refused: PDU {pdu_type:#04x} {body[:16].hex(' ')}")


def encode_command(elements: dict[str, object]) -> bytes:
    """A DIMSE command set in implicit VR LE, (0000,0000) group length first."""
    from pynetdicom.dsutils import encode

    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    body = encode(ds, True, True)
    assert body is not None
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def decode_command(data: bytes) -> Dataset:
    from pynetdicom.dsutils import decode

    return decode(io.BytesIO(data), True, True)


class RawAssociation:
    """A hand-written association requestor over a plain socket."""

    def __init__(self, port: int, host: str = HOST, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.peer_max_pdu = 0
        self.accepted: dict[int, str] = {}  # context id -> transfer syntax
        self.rejected: dict[int, int] = {}  # context id -> result

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def reset(self) -> None:
        """Close with an RST (SO_LINGER 0), the rudest way to disappear."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.settimeout(self.timeout * 6)
        self.sock.sendall(data)

    def associate(
        self,
        contexts: Sequence[tuple[int, str, Sequence[str]]] = ((1, VERIFICATION, (IMPLICIT_LE,)),),
        *,
        calling: str = "RAWSCU",
        called: str = "ANY-SCP",
        max_pdu: int = 16384,
    ) -> RawAssociation:
        self.send(build_associate_rq(calling=calling, called=called, contexts=contexts,
                                     max_pdu=max_pdu))  # fmt: skip
        pdu_type, body = recv_pdu(self.sock, self.timeout)
        if pdu_type != PDU_ASSOCIATE_AC:
            raise AssociationRefused(pdu_type, body)
        pos = 68  # version(2) reserved(2) called(16) calling(16) reserved(32)
        while pos + 4 <= len(body):
            item_type, _, n = struct.unpack(">BBH", body[pos : pos + 4])
            value = body[pos + 4 : pos + 4 + n]
            if item_type == 0x21:
                cid, result = value[0], value[2]
                ts = ""
                if len(value) >= 8 and value[4] == 0x40:
                    tlen = struct.unpack(">H", value[6:8])[0]
                    ts = value[8 : 8 + tlen].decode("ascii").rstrip("\x00 ")
                if result == 0:
                    self.accepted[cid] = ts
                else:
                    self.rejected[cid] = result
            elif item_type == 0x50:
                sub = 0
                while sub + 4 <= len(value):
                    st, _, sn = struct.unpack(">BBH", value[sub : sub + 4])
                    if st == 0x51 and sn == 4:
                        self.peer_max_pdu = struct.unpack(">I", value[sub + 4 : sub + 8])[0]
                    sub += 4 + sn
            pos += 4 + n
        return self

    def _max_pdv_data(self) -> int:
        limit = self.peer_max_pdu or 1 << 20
        return max(limit - 6, 64)  # PDV item header is 4 + 2 bytes

    def p_data(self, context_id: int, data: bytes, *, command: bool, last: bool) -> bytes:
        control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
        pdv = struct.pack(">IBB", len(data) + 2, context_id, control) + data
        return pdu(PDU_P_DATA_TF, pdv)

    def fragments(self, context_id: int, data: bytes, *, command: bool) -> Iterator[bytes]:
        size = self._max_pdv_data()
        if not data:
            yield self.p_data(context_id, b"", command=command, last=True)
            return
        for start in range(0, len(data), size):
            chunk = data[start : start + size]
            yield self.p_data(context_id, chunk, command=command,
                              last=start + size >= len(data))  # fmt: skip

    def send_message(self, context_id: int, command: bytes, dataset: bytes | None = None) -> None:
        out = b"".join(self.fragments(context_id, command, command=True))
        if dataset is not None:
            out += b"".join(self.fragments(context_id, dataset, command=False))
        self.send(out)

    def receive_message(self, timeout: float | None = None) -> tuple[Dataset, bytes | None]:
        """The next DIMSE message: (command set, data set bytes or None)."""
        deadline = time.monotonic() + (timeout or self.timeout)
        command = bytearray()
        dataset = bytearray()
        command_done = False
        while True:
            pdu_type, body = recv_pdu(self.sock, max(0.01, deadline - time.monotonic()))
            if pdu_type != PDU_P_DATA_TF:
                raise AssociationRefused(pdu_type, body)
            pos = 0
            while pos < len(body):
                n = struct.unpack(">I", body[pos : pos + 4])[0]
                control = body[pos + 5]
                chunk = body[pos + 6 : pos + 4 + n]
                pos += 4 + n
                if control & 0x01:
                    command += chunk
                    if control & 0x02:
                        command_done = True
                else:
                    dataset += chunk
                    if control & 0x02:
                        return decode_command(bytes(command)), bytes(dataset)
            if command_done:
                cmd = decode_command(bytes(command))
                if int(cmd.get("CommandDataSetType", 0x0101)) == 0x0101:
                    return cmd, None

    def echo(self, context_id: int = 1, message_id: int = 1) -> int:
        self.send_message(
            context_id,
            encode_command({
                "AffectedSOPClassUID": VERIFICATION, "CommandField": 0x0030,
                "MessageID": message_id, "CommandDataSetType": 0x0101,
            }),
        )  # fmt: skip
        rsp, _ = self.receive_message()
        return int(rsp.Status)

    def release(self) -> None:
        self.send(pdu(PDU_RELEASE_RQ, b"\x00" * 4))
        pdu_type, _ = recv_pdu(self.sock, self.timeout)
        if pdu_type != PDU_RELEASE_RP:
            raise AssociationRefused(pdu_type, b"")


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    return encode_command({
        "AffectedSOPClassUID": sop_class, "CommandField": 0x0001, "MessageID": message_id,
        "Priority": 0, "CommandDataSetType": 0x0000, "AffectedSOPInstanceUID": sop_instance,
    })  # fmt: skip


def process_rss_bytes(pid: int) -> int | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


# --------------------------------------------------------------------------
# judging what a receiver stored

#: Files a storage folder may legitimately hold besides instances (an index).
INDEX_SUFFIXES = (".sqlite", ".sqlite3", ".db", "-wal", "-shm", "-journal")


def stray_files(root: Path, keep: Iterable[Path] = ()) -> list[Path]:
    """Files under ``root`` that are neither in ``keep`` nor an index database, nor the
    marker a serving process keeps in ``.tmp`` while it runs."""
    keep = {Path(p) for p in keep}
    return sorted(
        p
        for p in all_files(root)
        if p not in keep
        and not p.name.endswith(INDEX_SUFFIXES)
        and not (".tmp" in p.parent.parts and p.name.startswith("serving-"))
    )


@dataclass(frozen=True)
class Expected:
    """What one received instance must be."""

    uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    reference: Path  # a Part-10 file whose data set bytes are the expected ones
    label: str


def verify_part10_received(
    expected: Iterable[Expected],
    received: dict[str, Path],
    *,
    filename_is_uid: bool,
) -> list[str]:
    """Every expected instance is received, as a valid Part-10 file whose file meta
    names it and whose data set bytes equal the reference's. Returns the problems."""
    expected = list(expected)
    problems: list[str] = []
    wanted = {e.uid for e in expected}
    for uid in sorted(received.keys() - wanted):
        problems.append(f"unexpected instance {uid} at {received[uid]}")
    for e in expected:
        path = received.get(e.uid)
        if path is None:
            problems.append(f"{e.label}: {e.uid} was not received/stored")
            continue
        where = f"{e.label} ({e.uid}, stored as {path})"
        if filename_is_uid and path.name != f"{e.uid}.dcm":
            problems.append(f"{where}: file name is not <SOPInstanceUID>.dcm")
        try:
            meta, data = read_part10(path)
        except Exception as exc:
            problems.append(f"{where}: not a readable Part-10 file: {exc!r}")
            continue
        for keyword, want in (
            ("TransferSyntaxUID", e.transfer_syntax_uid),
            ("MediaStorageSOPClassUID", e.sop_class_uid),
            ("MediaStorageSOPInstanceUID", e.uid),
        ):
            got = str(meta.get(keyword, "<absent>"))
            if got != want:
                problems.append(f"{where}: file meta {keyword} is {got}, expected {want}")
        try:
            ds = dcmread(path, stop_before_pixels=True)
            if str(ds.get("SOPInstanceUID", "")) != e.uid:
                problems.append(f"{where}: data set SOP Instance UID is {ds.get('SOPInstanceUID')}")
        except Exception as exc:
            problems.append(f"{where}: pydicom cannot read it: {exc!r}")
        diff = describe_difference(dataset_bytes(e.reference), data)
        if diff is not None:
            problems.append(f"{where}: data set differs from {e.reference}: {diff}")
    return problems


def scrape_metrics(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus endpoint on loopback, by name and labels."""
    from prometheus_client.parser import text_string_to_metric_families

    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def metric_sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)
