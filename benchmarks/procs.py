"""Server subprocesses: start, wait until listening, sample /proc, stop for sure.

Linux only (/proc). Everything listens on 127.0.0.1.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# dicomnet / pynetdicom logging ("WARNING", "ERROR", tracebacks), DCMTK ("W: ", "E: ", "F: ").
_ISSUE = re.compile(r"\b(WARNING|ERROR|CRITICAL|Traceback|Exception)\b|^[WEF]: ")


class ServerError(RuntimeError):
    """A server subprocess did not start, or died while being measured."""


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _listening_inodes(port: int) -> set[str]:
    found: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) >= 10 and parts[3] == "0A":  # 0A = LISTEN
                if int(parts[1].rsplit(":", 1)[1], 16) == port:
                    found.add(parts[9])
    return found


def _socket_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    try:
        entries = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return inodes
    for entry in entries:
        try:
            target = os.readlink(entry)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    return inodes


def listening(port: int, pid: int) -> bool:
    """Whether process `pid` owns a socket listening on `port` (no connection is made)."""
    inodes = _listening_inodes(port)
    return bool(inodes) and bool(inodes & _socket_inodes(pid))


@dataclass(frozen=True, slots=True)
class ProcSample:
    """CPU seconds (user + system, all threads), peak RSS (VmHWM), current RSS (VmRSS) in KiB
    and threads of one process (or of a process group: CPU and RSS summed, see `sample`)."""

    cpu_seconds: float
    peak_rss_kib: int
    rss_kib: int = 0
    threads: int = 0


def _status_fields(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "Threads"):
            out[key] = int(value.split()[0])
    return out


def _stat_fields(pid: int) -> list[str]:
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    return stat[stat.rindex(")") + 2 :].split()


def sample(pid: int) -> ProcSample:
    """Read /proc/PID/stat (utime + stime) and /proc/PID/status (VmHWM, VmRSS, Threads)."""
    fields = _stat_fields(pid)
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    status = _status_fields(pid)
    return ProcSample(
        (utime + stime) / CLOCK_TICKS,
        status.get("VmHWM", 0),
        status.get("VmRSS", 0),
        status.get("Threads", 0),
    )


def sample_group(pgid: int) -> ProcSample:
    """`sample` summed over the live processes of process group `pgid` (a server and the
    workers or per-association children it forked), plus the CPU of the children it has
    already reaped (cutime + cstime). Peak RSS: the sum of each member's VmHWM (an upper
    bound when the members did not peak together); for one process it is `sample`."""
    cpu = 0.0
    hwm = rss = threads = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            fields = _stat_fields(pid)
            if int(fields[2]) != pgid:  # field 5 of proc(5): pgrp
                continue
            status = _status_fields(pid)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        cpu += ticks / CLOCK_TICKS
        hwm += status.get("VmHWM", 0)
        rss += status.get("VmRSS", 0)
        threads += status.get("Threads", 0)
    return ProcSample(cpu, hwm, rss, threads)


class ServerProcess:
    """A server subprocess with its output in a log file; `stop()` always ends it.

    Used as a context manager: the process is stopped (SIGTERM, then SIGKILL after a
    grace period) when the block ends, whatever happened inside it.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        port: int,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        start_timeout: float = 30.0,
        listeners: int = 1,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.port = port
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.listeners = listeners  # listening sockets to wait for (serve --workers N: N)
        self.baseline: ProcSample | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise ServerError(f"{self.name} was not started")
        return self.proc.pid

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
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
        try:
            self._wait_listening()
            self.baseline = sample_group(self.pid)
        except BaseException:
            self.stop()
            raise

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServerError(
                    f"{self.name} exited with {self.returncode()} before listening on "
                    f"{self.port}; log:\n{self.log_tail()}"
                )
            if listening(self.port, self.pid) and (
                self.listeners <= 1 or len(_listening_inodes(self.port)) >= self.listeners
            ):
                return
            time.sleep(0.02)
        raise ServerError(f"{self.name} not listening on {self.port} after {self.start_timeout} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def log_tail(self, size: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "<no log>"
        return data[-size:].decode("utf-8", "replace")

    def log_issues(self, limit: int = 5) -> list[str]:
        """Lines of the server's output that look like warnings, errors or tracebacks."""
        try:
            lines = self.log_path.read_text("utf-8", "replace").splitlines()[1:]
        except OSError:
            return []
        found = [line.strip() for line in lines if _ISSUE.search(line)]
        if len(found) > limit:
            found = [*found[:limit], f"... and {len(found) - limit} more such lines"]
        return found

    def measure(self) -> tuple[float, int]:
        """(CPU seconds since it was listening, peak RSS in KiB); the process must be alive."""
        if not self.alive():
            raise ServerError(
                f"{self.name} died during the run (exit {self.returncode()}); "
                f"log:\n{self.log_tail()}"
            )
        now = self.sample()
        base = self.baseline.cpu_seconds if self.baseline is not None else 0.0
        return now.cpu_seconds - base, now.peak_rss_kib

    def wait_quiet(self, limit: float = 5.0, interval: float = 0.2) -> bool:
        """Wait until the process group has used under 5 % of a core over `interval`
        (at most `limit` s; False if it never was): what a server does after its last
        answer (dicomnet indexes in the background) is then in its CPU figure."""
        deadline = time.monotonic() + limit
        last = self.sample().cpu_seconds
        while time.monotonic() < deadline:
            time.sleep(interval)
            now = self.sample().cpu_seconds
            if now - last < 0.05 * interval:
                return True
            last = now
        return False

    def settle(self, limit: float = 10.0) -> None:
        """Wait until the process group's RSS stops changing (helpers it starts after
        listening, such as dicomnet's indexer process, have finished starting: at most
        `limit` s), then take the baseline again: growth is then measured from there."""
        deadline = time.monotonic() + limit
        last = self.sample()
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = self.sample()
            if abs(now.rss_kib - last.rss_kib) < 512:
                break
            last = now
        self.baseline = self.sample()

    def sample(self) -> ProcSample:
        """The server's process group now (CPU since it started, not since listening)."""
        return sample_group(self.pid)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; safe to call twice."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        # The server runs in its own session (start_new_session): signal only its group.
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=grace)
