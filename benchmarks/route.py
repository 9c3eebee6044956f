"""``python -m benchmarks.route [--quick] [--repetitions N] [--markdown FILE] [--json FILE]``

The store-and-forward gateway `dicomnet route` measured beside the alternatives, on
127.0.0.1, every destination a DCMTK ``storescp +B`` (one association at a time):

1. **The cost of the hop**: one ``storescu`` (one association) sends N instances of
   ~2 KB (as S3) or ~512 KB (as S4) to storescp directly, through ``dicomnet route``
   (queue fsynced, the default, and ``fsync = false``), and through Orthanc used as a
   router (the auto-routing Lua script of Orthanc's documentation). Two rates:
   **acknowledged** (N / storescu's wall time: how fast the router takes them) and
   **delivered** (N / time from storescu's start until storescp closed the N-th file,
   seen through inotify); the router's CPU seconds and peak RSS.
2. **1,000 concurrent associations** into one route process (dicomnet client API, one
   asyncio program): all opened at once and held, then one small C-STORE on each, then
   all released; route's RSS idle, with all open and after, and so the memory per
   association. Again with route started under ``ulimit -n 1024``, a common default.
3. **Memory per queued instance**: the destination down (a port nothing listens on),
   10,000 small instances sent through route: its RSS growth per instance and the queue
   folder's disk use per instance; then the destination is started and the time until
   every copy was delivered is taken.

Repetitions of part 1 are interleaved; parts 2 and 3 run once. Exit status 1 when an
instance was lost or something failed.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import select
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/route.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers, report
from benchmarks.data import InstanceSet, make_ct_512k, make_sc_2k, subset
from benchmarks.find_scp import backend_options
from benchmarks.procs import HOST, ProcSample, ServerError, ServerProcess, free_port
from benchmarks.report import _num, _ratio, markdown_table, text_table
from benchmarks.run import _loadavg, _terminate, machine_info, machine_line, quiet_page_cache

ROUTE_AET = "ROUTER"
ORTHANC_AET = "ORTHANC"
DEST_AET = "STORESCP"
DEST_NAME = "dest"
EXPLICIT_VR_LE = peers.EXPLICIT_VR_LE
# Orthanc's own auto-routing sample (OrthancServer/Resources/Samples/Lua/Autorouting.lua).
ORTHANC_LUA = (
    "function OnStoredInstance(instanceId, tags, metadata)\n"
    f"  Delete(SendToModality(instanceId, '{DEST_NAME}'))\n"
    "end\n"
)

# Counts: (full, --quick).
HOP_COUNTS = {"small": (2000, 200), "large": (300, 30)}
MANY_ASSOCIATIONS = (1000, 1000)
QUEUED_COUNT = (10_000, 1000)
LOW_NOFILE = 1024  # the soft limit on open files of many systems


@dataclass(frozen=True, slots=True)
class Way:
    """One way from storescu to storescp (part 1)."""

    key: str
    label: str
    durability: str


WAYS = (
    Way("direct", "storescu > storescp", "storescp +B: written, no fsync"),
    Way(
        "route",
        "storescu > dicomnet route > storescp",
        "queue file fsynced and linked, folder fsynced, before the answer; removal fsynced",
    ),
    Way(
        "route-nofsync",
        "storescu > dicomnet route (fsync = false) > storescp",
        "queue file written and linked, no fsync",
    ),
    Way(
        "orthanc",
        "storescu > Orthanc (Lua auto-routing) > storescp",
        "Orthanc defaults: SQLite index, storage area fsynced (SyncStorageArea true)",
    ),
)
PATH_LABELS = {p.key: p.label for p in WAYS}
RATIOS = (
    ("route / direct", "route", "direct"),
    ("route (fsync = false) / direct", "route-nofsync", "direct"),
    ("route / Orthanc (both fsync)", "route", "orthanc"),
    ("route (fsync = false) / Orthanc", "route-nofsync", "orthanc"),
)


# --- arrivals at the destination -----------------------------------------------------------


class Arrivals:
    """Files a receiver finished writing into `folder`, counted as they come (inotify:
    IN_CLOSE_WRITE and IN_MOVED_TO; names starting with a dot are left out), with the
    `time.perf_counter()` of each. Should the kernel's event queue overflow, `wait`
    counts the folder instead."""

    _IN_CLOSE_WRITE = 0x08
    _IN_MOVED_TO = 0x80
    _IN_Q_OVERFLOW = 0x4000
    _EVENT = struct.Struct("iIII")

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        libc = ctypes.CDLL(None, use_errno=True)
        self._fd: int = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        mask = self._IN_CLOSE_WRITE | self._IN_MOVED_TO
        if libc.inotify_add_watch(self._fd, os.fsencode(folder), mask) < 0:
            errno = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(errno, f"inotify_add_watch {folder}")
        self._names: set[bytes] = set()
        self.times: list[float] = []  # the k-th distinct file arrived at times[k - 1]
        self.overflowed = False
        self._changed = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._read, name="arrivals", daemon=True)
        self._thread.start()

    def __enter__(self) -> Arrivals:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self) -> None:
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        size = self._EVENT.size
        while not self._stop:
            if not poller.poll(100):
                continue
            now = time.perf_counter()
            try:
                data = os.read(self._fd, 1 << 16)
            except BlockingIOError:
                continue
            offset = 0
            with self._changed:
                while offset + size <= len(data):
                    _wd, mask, _cookie, length = self._EVENT.unpack_from(data, offset)
                    name = data[offset + size : offset + size + length].split(b"\0", 1)[0]
                    offset += size + length
                    if mask & self._IN_Q_OVERFLOW:
                        self.overflowed = True
                    elif name and not name.startswith(b".") and name not in self._names:
                        self._names.add(name)
                        self.times.append(now)
                self._changed.notify_all()

    @property
    def count(self) -> int:
        return len(self.times)

    def wait(
        self, count: int, deadline: float, give_up: Callable[[], bool] | None = None
    ) -> float | None:
        """The time the `count`-th file arrived, or None if it had not by `deadline`
        (`time.perf_counter()`) or once `give_up()` says so (checked twice a second)."""
        with self._changed:
            while len(self.times) < count and not self.overflowed:
                left = deadline - time.perf_counter()
                if left <= 0 or (give_up is not None and give_up()):
                    return None
                self._changed.wait(min(left, 0.5))
            if len(self.times) >= count:
                return self.times[count - 1]
        while time.perf_counter() < deadline:  # overflowed: count what is on disk
            if peers.count_stored(self.folder) >= count:
                return time.perf_counter()
            if give_up is not None and give_up():
                return None
            time.sleep(0.05)
        return None

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2.0)
        try:
            os.close(self._fd)
        except OSError:
            pass


# --- servers -------------------------------------------------------------------------------


def storescp(workdir: Path, name: str, port: int | None = None) -> tuple[ServerProcess, Path]:
    """DCMTK's storescp +B (TCP_NODELAY on, one association at a time), as in S3/S4."""
    storage = workdir / "received" / name
    storage.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    argv, env = peers.storescp_scp().command(port, storage, 0)
    log = workdir / "logs" / f"{name}-storescp.log"
    return ServerProcess("storescp", argv, port, log, env=env), storage


def route_server(
    workdir: Path, name: str, dest_port: int, *, fsync: bool = True, nofile: int | None = None
) -> tuple[ServerProcess, Path]:
    """`dicomnet route` with one destination (storescp at `dest_port`, the defaults: 2
    associations, window 1) and one rule forwarding everything; `nofile`: started under
    `ulimit -n nofile`. Returns the server and its queue folder."""
    folder = workdir / "route" / name
    queue = folder / "queue"
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = folder / "route.toml"
    config.write_text(
        f'[listen]\nhost = "{HOST}"\nport = {port}\naet = "{ROUTE_AET}"\n\n'
        f'[queue]\nfolder = "{queue}"\nfsync = {"true" if fsync else "false"}\n\n'
        f'[[destination]]\nname = "{DEST_NAME}"\naet = "{DEST_AET}"\nhost = "{HOST}"\n'
        f"port = {dest_port}\n\n"
        f'[[rule]]\nforward = ["{DEST_NAME}"]\n'
    )
    argv = [sys.executable, "-m", "dicomnet", "route", "--config", str(config)]
    if nofile is not None:  # `exec` keeps the PID that ServerProcess watches
        argv = ["sh", "-c", f'ulimit -n {nofile} && exec "$@"', "sh", *argv]
    env = peers._loop_env(peers._base_env(nodelay=False), "uvloop")
    log = workdir / "logs" / f"{name}-route.log"
    server = ServerProcess("dicomnet route", argv, port, log, env=env, cwd=peers.REPO_ROOT)
    return server, queue


def orthanc_server(workdir: Path, name: str, dest_port: int) -> ServerProcess:
    """Orthanc with its defaults but for: a private storage and index folder, free DICOM
    and HTTP ports, no plugins, the auto-routing Lua script, storescp as modality `dest`.
    TCP_NODELAY=1, as for storescp: Orthanc's DICOM layer is DCMTK's, which leaves
    Nagle's algorithm on without it (~40 ms a C-STORE, measured: 21 store/s)."""
    folder = workdir / "orthanc" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "route.lua").write_text(ORTHANC_LUA)
    port = free_port()
    config = {
        "Name": "bench-router",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "DicomAet": ORTHANC_AET,
        "DicomPort": port,
        "HttpPort": free_port(),
        "RemoteAccessAllowed": False,
        "Plugins": [],
        "LuaScripts": [str(folder / "route.lua")],
        "DicomModalities": {DEST_NAME: [DEST_AET, HOST, dest_port]},
    }
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    log = workdir / "logs" / f"{name}-orthanc.log"
    env = peers._base_env(nodelay=True)
    return ServerProcess("Orthanc", ["Orthanc", str(path)], port, log, env=env, cwd=folder)


def orthanc_version() -> str:
    exe = shutil.which("Orthanc")
    if exe is None:
        return "not installed"
    try:
        out = subprocess.run(
            [exe, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    # "/usr/sbin/Orthanc 1.10.1" (argv[0], then the version)
    return out.strip().splitlines()[0].split()[-1] if out.strip() else "unknown"


def orthanc_issues(server: ServerProcess, limit: int = 5) -> list[str]:
    """Orthanc's error lines ("E1205 17:33:53.878204 file.cpp:58] ...")."""
    try:
        lines = server.log_path.read_text("utf-8", "replace").splitlines()[1:]
    except OSError:
        return []
    found = [ln.strip() for ln in lines if len(ln) > 5 and ln[0] == "E" and ln[1:5].isdigit()]
    return found[:limit]


def orthanc_failed(record: HopRecord) -> bool:
    """Whether Orthanc itself failed the run (an error in its log). Orthanc 1.10.1 with
    the Lua script sometimes does: deleting a routed instance removes its storage
    folders when empty while another instance is being written under them
    ("boost::filesystem::create_directory: No such file or directory"); that C-STORE
    fails and the association is aborted (storescu: "Peer aborted Association")."""
    return (
        record.path == "orthanc"
        and not record.clean
        and any(e.startswith("Orthanc log") for e in record.errors)
    )


def steady(server: ServerProcess) -> ProcSample:
    """The server's process group once its RSS stopped changing (at most 10 s)."""
    server.settle()
    assert server.baseline is not None
    return server.baseline


def disk_use(folder: Path) -> tuple[int, int]:
    """(bytes allocated, apparent bytes) of `folder` and everything under it."""
    allocated = apparent = 0
    for root, _dirs, names in os.walk(folder):  # each folder is a root once
        for entry in (root, *(os.path.join(root, n) for n in names)):
            try:
                st = os.lstat(entry)
            except OSError:
                continue
            allocated += st.st_blocks * 512
            apparent += st.st_size
    return allocated, apparent


def pending(queue: Path) -> int:
    return sum(1 for _ in (queue / DEST_NAME / "pending").glob("*.dcm"))


# --- part 1: the hop -----------------------------------------------------------------------


@dataclass(slots=True)
class HopRecord:
    path: str
    size: str
    repetition: int
    count: int
    acknowledged_s: float = 0.0
    delivered_s: float | None = None  # None: not all delivered in time
    delivered: int = 0
    router_cpu_s: float | None = None
    router_peak_rss_kib: int | None = None
    dest_cpu_s: float | None = None
    storescu_ok: bool = False
    errors: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return self.storescu_ok and self.delivered_s is not None and not self.errors

    @property
    def acknowledged_rate(self) -> float:
        return self.count / self.acknowledged_s if self.storescu_ok and self.acknowledged_s else 0


@dataclass(slots=True)
class HopSummary:
    path: str
    size: str
    count: int
    repetitions: int
    clean: int
    acknowledged: tuple[float, float, float]  # median, min, max (instances/s)
    delivered: tuple[float, float, float] | None
    router_cpu_s: float | None
    router_peak_rss_mib: float | None
    dest_cpu_s: float | None
    failed: int
    errors: list[str]


def hop(
    workdir: Path,
    path: str,
    size: str,
    instances: InstanceSet,
    rep: int,
    timeout: float,
    tag: str = "",
) -> HopRecord:
    """One storescu run along `path`, every server fresh (`tag`: for a run again)."""
    count = len(instances.files)
    name = f"{path}-{size}-r{rep}{tag}"
    record = HopRecord(path, size, rep, count)
    dest, storage = storescp(workdir, name)
    router: ServerProcess | None = None
    try:
        with dest:
            aec, port = DEST_AET, dest.port
            if path in ("route", "route-nofsync"):
                router, _queue = route_server(workdir, name, dest.port, fsync=path == "route")
            elif path == "orthanc":
                router = orthanc_server(workdir, name, dest.port)
            if router is not None:
                router.start()
                router.settle()  # what it starts after listening has started
                aec, port = (ROUTE_AET if path != "orthanc" else ORTHANC_AET), router.port
            dest.settle()
            quiet_page_cache()
            scu = peers.DcmtkSCU(aec=aec)
            servers = [dest] if router is None else [dest, router]
            with Arrivals(storage) as arrivals:
                t0 = time.perf_counter()
                result = scu.store_one(port, instances, timeout)
                record.acknowledged_s = result.seconds
                record.storescu_ok = result.ok == count and not result.errors
                record.errors.extend(result.errors)
                # After a failed storescu, whatever made it through arrives soon or never.
                deadline = t0 + timeout if record.storescu_ok else time.perf_counter() + 10
                done = arrivals.wait(
                    count, deadline, give_up=lambda: not all(s.alive() for s in servers)
                )
                record.delivered = arrivals.count
            if done is not None:
                record.delivered_s = done - t0
            else:
                record.errors.append(f"{arrivals.count} of {count} delivered")
                record.errors.extend(
                    f"{s.name} ended during the run, exit status {s.returncode()}"
                    for s in servers
                    if not s.alive()
                )
            if router is not None:
                router.wait_quiet()
                record.router_cpu_s, record.router_peak_rss_kib = router.measure()
            dest.wait_quiet()
            record.dest_cpu_s, _ = dest.measure()
    except ServerError as exc:
        record.errors.append(str(exc))
    finally:
        if router is not None:
            router.stop()
            issues = router.log_issues() if path != "orthanc" else orthanc_issues(router)
            record.errors.extend(f"{router.name} log: {line}" for line in issues)
        dest.stop()
    stored = peers.count_stored(storage)
    if stored != count and not any("delivered" in e for e in record.errors):
        record.errors.append(f"storescp stored {stored} of {count}")
    return record


def _spread(values: Sequence[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def summarise_hops(records: list[HopRecord]) -> list[HopSummary]:
    out: list[HopSummary] = []
    for size in HOP_COUNTS:
        for p in WAYS:
            runs = [r for r in records if r.path == p.key and r.size == size]
            if not runs:
                continue
            clean = [r for r in runs if r.clean]
            basis = clean or runs
            delivered = [r.count / r.delivered_s for r in basis if r.delivered_s]
            cpu = [r.router_cpu_s for r in basis if r.router_cpu_s is not None]
            dest_cpu = [r.dest_cpu_s for r in basis if r.dest_cpu_s is not None]
            rss = [r.router_peak_rss_kib for r in runs if r.router_peak_rss_kib]
            errors = [f"rep {r.repetition}: {e}" for r in runs for e in r.errors]
            out.append(
                HopSummary(
                    path=p.key,
                    size=size,
                    count=runs[0].count,
                    repetitions=len(runs),
                    clean=len(clean),
                    acknowledged=_spread([r.acknowledged_rate for r in basis]),
                    delivered=_spread(delivered) if delivered else None,
                    router_cpu_s=statistics.median(cpu) if cpu else None,
                    router_peak_rss_mib=max(rss) / 1024 if rss else None,
                    dest_cpu_s=statistics.median(dest_cpu) if dest_cpu else None,
                    failed=sum(r.count - r.delivered for r in runs),
                    errors=errors,
                )
            )
    return out


def hop_ratios(summaries: list[HopSummary]) -> list[tuple[str, dict[str, float | None]]]:
    """{"small acknowledged": ratio, ...} for each of RATIOS (None without clean runs)."""
    by = {(s.path, s.size): s for s in summaries}
    rows: list[tuple[str, dict[str, float | None]]] = []
    for label, num_key, den_key in RATIOS:
        values: dict[str, float | None] = {}
        for size in HOP_COUNTS:
            num, den = by.get((num_key, size)), by.get((den_key, size))
            for rate in ("acknowledged", "delivered"):
                value = None
                if num and den and num.clean and den.clean:
                    a, b = getattr(num, rate), getattr(den, rate)
                    if a is not None and b is not None and b[0] > 0:
                        value = a[0] / b[0]
                values[f"{size} {rate}"] = value
        if any(v is not None for v in values.values()):
            rows.append((label, values))
    return rows


# --- part 2: many associations -------------------------------------------------------------


@dataclass(slots=True)
class ManyResult:
    label: str
    nofile: int  # route's soft limit on open files
    asked: int
    accepted: int = 0
    refused: int = 0
    stored: int = 0
    released: int = 0
    delivered: int = 0
    open_s: float = 0.0  # all association requests started to all answered
    store_s: float = 0.0  # go to all C-STOREs answered
    release_s: float = 0.0
    deliver_s: float | None = None  # first C-STORE sent to the destination having all
    rss_idle_kib: int = 0
    rss_open_kib: int = 0
    rss_after_kib: int = 0
    peak_rss_kib: int = 0
    threads_open: int = 0
    threads_after: int = 0
    route_cpu_s: float = 0.0
    store_started: float = 0.0  # time.perf_counter()
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # refusals and route's log, when expected

    @property
    def kib_per_association(self) -> float | None:
        if not self.accepted:
            return None
        return (self.rss_open_kib - self.rss_idle_kib) / self.accepted

    def error(self, text: str, *, expected: bool = False) -> None:
        kept = self.notes if expected else self.errors
        if len(kept) < 5 and text not in kept:
            kept.append(text)


async def _hold_many(
    port: int,
    files: Sequence[Path],
    sop_class: str,
    server: ServerProcess,
    out: ManyResult,
    refusals_expected: bool,
) -> None:
    """Open len(files) associations at once and hold them; once every request was
    answered, sample the server, then one C-STORE on each; then release them all."""
    import anyio

    import dicomnet

    contexts = [dicomnet.PresentationContext(sop_class, (EXPLICIT_VR_LE,))]
    total = len(files)
    answered = stored_or_failed = 0
    all_answered, all_stored = anyio.Event(), anyio.Event()
    go_store, go_release = anyio.Event(), anyio.Event()

    def one_answered() -> None:
        nonlocal answered
        answered += 1
        if answered == total:
            all_answered.set()

    def one_stored() -> None:
        nonlocal stored_or_failed
        stored_or_failed += 1
        if go_store.is_set() and stored_or_failed >= out.accepted:
            all_stored.set()

    async def one(path: Path) -> None:
        state = "requesting"
        try:
            async with dicomnet.connect(
                HOST, port, aet=peers.SCU_AET, aec=ROUTE_AET, contexts=contexts
            ) as assoc:
                state = "open"
                out.accepted += 1
                one_answered()
                await go_store.wait()
                state = "storing"
                try:
                    await assoc.store(path)
                    out.stored += 1
                except dicomnet.DimseError as exc:
                    out.error(f"C-STORE: {exc}")
                state = "stored"
                one_stored()
                await go_release.wait()
                state = "releasing"
            out.released += 1
        except Exception as exc:  # a DicomNetError, or whatever else the peer causes
            text = f"{type(exc).__name__}: {exc}"
            if state == "requesting":
                out.refused += 1
                out.error(f"association: {text}", expected=refusals_expected)
                one_answered()
            else:
                out.error(f"while {state}: {text}")
                if state in ("open", "storing"):
                    one_stored()

    async with anyio.create_task_group() as tg:
        t0 = time.perf_counter()
        for path in files:
            tg.start_soon(one, path)
        await all_answered.wait()
        out.open_s = time.perf_counter() - t0
        await anyio.sleep(1.0)
        held = await anyio.to_thread.run_sync(server.sample)
        out.rss_open_kib, out.threads_open = held.rss_kib, held.threads
        out.store_started = time.perf_counter()
        go_store.set()
        if stored_or_failed >= out.accepted:
            all_stored.set()
        await all_stored.wait()
        out.store_s = time.perf_counter() - out.store_started
        t2 = time.perf_counter()
        go_release.set()
    out.release_s = time.perf_counter() - t2


def many(
    workdir: Path, files: Sequence[Path], sop_class: str, timeout: float, nofile: int | None
) -> ManyResult:
    """Part 2 against a fresh route (and storescp behind it); `nofile`: route started
    under `ulimit -n nofile` (refusals are then expected, and only reported)."""
    import resource

    import anyio

    limit = nofile if nofile is not None else resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    label = "as inherited" if nofile is None else "ulimit -n"
    out = ManyResult(f"{label} ({limit} files)", limit, len(files))
    name = f"many-{nofile or 'inherited'}"
    dest, storage = storescp(workdir, name)
    router: ServerProcess | None = None
    try:
        with dest:
            router, _queue = route_server(workdir, name, dest.port, nofile=nofile)
            with router:
                idle = steady(router)
                out.rss_idle_kib = idle.rss_kib
                with Arrivals(storage) as arrivals:

                    async def main() -> None:
                        assert router is not None
                        with anyio.fail_after(timeout):
                            await _hold_many(
                                router.port, files, sop_class, router, out, nofile is not None
                            )

                    try:
                        anyio.run(main, backend_options=backend_options("uvloop"))
                    except TimeoutError:
                        out.error(f"timed out after {timeout:g} s")
                    done = arrivals.wait(
                        out.stored,
                        time.perf_counter() + 120,
                        give_up=lambda: not (router.alive() and dest.alive()),
                    )
                    out.delivered = arrivals.count
                    if done is not None and out.store_started:
                        out.deliver_s = done - out.store_started
                after = steady(router)
                out.rss_after_kib = after.rss_kib
                out.peak_rss_kib = after.peak_rss_kib
                out.threads_after = after.threads
                out.route_cpu_s = after.cpu_seconds - idle.cpu_seconds
    except ServerError as exc:
        out.error(str(exc))
    finally:
        if router is not None:
            router.stop()
            for line in router.log_issues():
                out.error(f"route log: {line}", expected=nofile is not None)
    if out.delivered != out.stored:
        out.error(f"{out.delivered} of the {out.stored} stored delivered")
    if nofile is None and out.accepted < out.asked:
        out.error(f"{out.refused} of {out.asked} associations refused")
    return out


# --- part 3: a queue on disk ---------------------------------------------------------------


@dataclass(slots=True)
class QueuedResult:
    count: int
    acknowledged_s: float = 0.0
    storescu_ok: bool = False
    queued: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    peak_rss_kib: int = 0
    threads: int = 0
    route_cpu_s: float = 0.0
    disk_allocated: int = 0  # bytes added to the queue folder
    disk_apparent: int = 0
    delivered: int = 0
    drain_s: float | None = None  # destination started -> last copy delivered
    left_in_queue: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def rss_bytes_per_instance(self) -> float:
        return (self.rss_after_kib - self.rss_before_kib) * 1024 / self.count

    @property
    def peak_bytes_per_instance(self) -> float:
        return (self.peak_rss_kib - self.rss_before_kib) * 1024 / self.count


EXPECTED_WHEN_DOWN = ("unreachable", "reachable again")


def queued(workdir: Path, instances: InstanceSet, timeout: float) -> QueuedResult:
    """Part 3: the destination down while `instances` go in, then up."""
    count = len(instances.files)
    out = QueuedResult(count)
    down_port = free_port()  # nothing listens here until the destination is started
    router, queue = route_server(workdir, "queued", down_port)
    try:
        with router:
            before = steady(router)
            out.rss_before_kib = before.rss_kib
            disk_before = disk_use(queue)
            quiet_page_cache()
            result = peers.DcmtkSCU(aec=ROUTE_AET).store_one(router.port, instances, timeout)
            out.acknowledged_s = result.seconds
            out.storescu_ok = result.ok == count and not result.errors
            out.errors.extend(result.errors)
            after = steady(router)
            out.rss_after_kib, out.peak_rss_kib = after.rss_kib, after.peak_rss_kib
            out.threads = after.threads
            out.route_cpu_s = after.cpu_seconds - before.cpu_seconds
            out.queued = pending(queue)
            disk_after = disk_use(queue)
            out.disk_allocated = disk_after[0] - disk_before[0]
            out.disk_apparent = disk_after[1] - disk_before[1]
            if out.queued != count:
                out.errors.append(f"{out.queued} of {count} in the queue")
            # The destination comes up: every copy must arrive.
            dest, storage = storescp(workdir, "queued", down_port)
            with Arrivals(storage) as arrivals, dest:
                t0 = time.perf_counter()
                done = arrivals.wait(
                    out.queued, t0 + timeout, give_up=lambda: not (router.alive() and dest.alive())
                )
                out.delivered = arrivals.count
                if done is not None:
                    out.drain_s = done - t0
                deadline = time.monotonic() + 10
                while pending(queue) and time.monotonic() < deadline:
                    time.sleep(0.1)
                out.left_in_queue = pending(queue)
            if out.delivered != count:
                out.errors.append(f"{out.delivered} of {count} delivered once the destination ran")
            if out.left_in_queue:
                out.errors.append(f"{out.left_in_queue} copies left in the queue")
    except ServerError as exc:
        out.errors.append(str(exc))
    finally:
        router.stop()
        for line in router.log_issues(limit=1000):
            if not any(word in line for word in EXPECTED_WHEN_DOWN) and len(out.errors) < 8:
                out.errors.append(f"route log: {line}")
    return out


# --- output --------------------------------------------------------------------------------


def _mib(kib: float | None) -> str:
    return _num(None if kib is None else kib / 1024, " MiB")


HOP_HEADERS = (
    "size",
    "path",
    "n x reps",
    "acknowledged/s",
    "min-max",
    "delivered/s",
    "min-max",
    "router CPU s",
    "router peak RSS",
    "storescp CPU s",
    "lost",
)


def hop_rows(summaries: list[HopSummary]) -> list[list[str]]:
    rows = []
    for s in summaries:
        reps = f"{s.count} x {s.repetitions}" + (
            "" if s.clean == s.repetitions else f" ({s.clean} ok)"
        )
        d = s.delivered
        rows.append(
            [
                s.size,
                PATH_LABELS[s.path],
                reps,
                _num(s.acknowledged[0]),
                f"{_num(s.acknowledged[1])}-{_num(s.acknowledged[2])}",
                _num(d[0]) if d else "-",
                f"{_num(d[1])}-{_num(d[2])}" if d else "-",
                _num(s.router_cpu_s),
                _num(s.router_peak_rss_mib, " MiB"),
                _num(s.dest_cpu_s),
                str(s.failed),
            ]
        )
    return rows


def ratio_rows(summaries: list[HopSummary]) -> tuple[list[str], list[list[str]]]:
    rows = hop_ratios(summaries)
    keys = [f"{size} {rate}" for size in HOP_COUNTS for rate in ("acknowledged", "delivered")]
    return ["ratio (median rates)", *keys], [
        [label, *(_ratio(values.get(k)) for k in keys)] for label, values in rows
    ]


MANY_HEADERS = (
    "route",
    "associations",
    "accepted",
    "stored",
    "delivered",
    "open all s",
    "store all s",
    "delivered s",
    "RSS idle",
    "RSS all open",
    "RSS after",
    "peak RSS",
    "KiB/assoc",
    "threads open/after",
    "route CPU s",
)


def many_rows(results: list[ManyResult]) -> list[list[str]]:
    return [
        [
            m.label,
            str(m.asked),
            str(m.accepted),
            str(m.stored),
            str(m.delivered),
            _num(m.open_s),
            _num(m.store_s),
            _num(m.deliver_s),
            _mib(m.rss_idle_kib),
            _mib(m.rss_open_kib),
            _mib(m.rss_after_kib),
            _mib(m.peak_rss_kib),
            _num(m.kib_per_association),
            f"{m.threads_open}/{m.threads_after}",
            _num(m.route_cpu_s),
        ]
        for m in results
    ]


QUEUED_HEADERS = (
    "instances",
    "acknowledged/s",
    "queued",
    "RSS before",
    "RSS after",
    "RSS growth/instance",
    "peak growth/instance",
    "disk/instance",
    "delivered when up",
    "drain s",
)


def queued_rows(q: QueuedResult) -> list[list[str]]:
    rate = q.count / q.acknowledged_s if q.acknowledged_s and q.storescu_ok else 0.0
    return [
        [
            str(q.count),
            _num(rate),
            str(q.queued),
            _mib(q.rss_before_kib),
            _mib(q.rss_after_kib),
            f"{q.rss_bytes_per_instance:,.0f} B",
            f"{q.peak_bytes_per_instance:,.0f} B",
            f"{q.disk_allocated / q.count:,.0f} B ({q.disk_apparent / q.count:,.0f} B apparent)",
            f"{q.delivered} of {q.count}",
            _num(q.drain_s),
        ]
    ]


def failure_lines(
    hops: list[HopSummary],
    manys: list[ManyResult],
    q: QueuedResult | None,
    again: Sequence[HopRecord] = (),
) -> list[str]:
    lines = [
        f"{r.size} {PATH_LABELS[r.path]}, rep {r.repetition}, failed and run again: "
        + " | ".join(r.errors[:3])
        for r in again
    ]
    lines += [
        f"{s.size} {PATH_LABELS[s.path]}: " + " | ".join(s.errors[:3]) for s in hops if s.errors
    ]
    lines += [f"{m.label}: " + " | ".join(m.errors[:3]) for m in manys if m.errors]
    lines += [f"{m.label} (expected): " + " | ".join(m.notes[:3]) for m in manys if m.notes]
    if q is not None and q.errors:
        lines.append("queued: " + " | ".join(q.errors[:3]))
    # One line each: a server's log tail spans several.
    return [" / ".join(p.strip() for p in line.splitlines() if p.strip()) for line in lines]


def render(
    table: Callable[[Sequence[str], list[list[str]]], str],
    hops: list[HopSummary],
    manys: list[ManyResult],
    q: QueuedResult | None,
    counts: dict[str, int],
    again: Sequence[HopRecord] = (),
) -> str:
    parts: list[str] = []
    if hops:
        parts += [
            "Part 1, the hop: one storescu (one association) into each path, "
            f"{counts['small']} instances of ~2 KB and {counts['large']} of ~512 KB; "
            "delivered = all closed by storescp (inotify), timed from storescu's start.",
            "",
            table(HOP_HEADERS, hop_rows(hops)),
            "",
            table(*ratio_rows(hops)),
            "",
            "Durability: "
            + "; ".join(f"{p.label}: {p.durability}" for p in WAYS if p.key != "direct")
            + ".",
            "",
        ]
    if manys:
        parts += [
            f"Part 2, {manys[0].asked} associations held at once by the dicomnet client "
            "(uvloop, one process), one ~2 KB C-STORE on each, then released; "
            "KiB/assoc = (RSS all open - RSS idle) / accepted; delivered s: from the "
            "first C-STORE until storescp had them all; route CPU: idle to after.",
            "",
            table(MANY_HEADERS, many_rows(manys)),
            "",
        ]
    if q is not None:
        parts += [
            f"Part 3, a queue on disk: destination down, {q.count} instances of ~2 KB "
            "through route (fsync), then the destination started.",
            "",
            table(QUEUED_HEADERS, queued_rows(q)),
            "",
        ]
    failures = failure_lines(hops, manys, q, again)
    parts.append("Failures, errors and refusals: " + ("none" if not failures else "\n"))
    parts += [f"- {line}" for line in failures]
    return "\n".join(parts) + "\n"


def _text_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    return text_table(list(headers), rows)


def _markdown_table(headers: Sequence[str], rows: list[list[str]]) -> str:
    return markdown_table(list(headers), rows)


# --- main ----------------------------------------------------------------------------------


PARTS = ("hop", "many", "queued")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.route",
        description="dicomnet route against storescp directly and Orthanc as a router "
        "(see benchmarks/README.md)",
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition, small counts")
    parser.add_argument("--repetitions", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="write JSON")
    parser.add_argument("--markdown", type=Path, default=None, metavar="FILE", help="write tables")
    parser.add_argument(
        "--part", action="append", choices=PARTS, default=None, help="only these (repeatable)"
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="limit for one run, seconds (600)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep data, queues and logs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    repetitions = args.repetitions or (1 if args.quick else 3)
    parts = args.part or list(PARTS)
    pick = 1 if args.quick else 0
    counts = {size: c[pick] for size, c in HOP_COUNTS.items()}
    n_many, n_queued = MANY_ASSOCIATIONS[pick], QUEUED_COUNT[pick]
    missing = [t for t in ("storescu", "storescp") if shutil.which(peers.dcmtk(t)) is None]
    if missing:
        print(f"DCMTK tools missing ({', '.join(missing)}): nothing to measure", file=sys.stderr)
        return 1
    paths = [p.key for p in WAYS]
    if shutil.which("Orthanc") is None:
        print("Orthanc not installed: its rows are skipped")
        paths.remove("orthanc")
    import anyio  # noqa: F401  (imported before anything is timed)

    import dicomnet  # noqa: F401

    info = machine_info()
    info["orthanc"] = orthanc_version()
    line = f"{machine_line(info)}, Orthanc {info['orthanc']}"
    print(line, flush=True)
    started = datetime.now(timezone.utc).astimezone()
    t_start = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicomnet-route-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    records: list[HopRecord] = []
    again: list[HopRecord] = []  # Orthanc runs that Orthanc failed, run again once
    manys: list[ManyResult] = []
    q: QueuedResult | None = None
    try:
        need_small = max(
            counts["small"] if "hop" in parts else 0,
            n_many if "many" in parts else 0,
            n_queued if "queued" in parts else 0,
        )
        t0 = time.perf_counter()
        small_all = make_sc_2k(workdir / "data" / f"sc2k-{need_small}", need_small)
        sets = {"small": subset(small_all, workdir / "data" / "hop-small", counts["small"])}
        if "hop" in parts:
            sets["large"] = make_ct_512k(workdir / "data" / "hop-large", counts["large"])
        print(f"generated the instances in {time.perf_counter() - t0:.1f} s", flush=True)
        if "hop" in parts:
            for rep in range(1, repetitions + 1):
                print(f"part 1, repetition {rep} of {repetitions}", flush=True)
                for size, instances in sets.items():
                    for path in paths:
                        r = hop(workdir, path, size, instances, rep, args.timeout)
                        if orthanc_failed(r):
                            print(f"  Orthanc failed ({r.errors[-1][:200]}): again", flush=True)
                            again.append(r)
                            r = hop(workdir, path, size, instances, rep, args.timeout, "-again")
                        records.append(r)
                        delivered = f"{r.count / r.delivered_s:9.1f}" if r.delivered_s else "     -"
                        print(
                            f"  {size:5s} {path:14s} acknowledged {r.acknowledged_rate:9.1f}/s "
                            f"delivered {delivered}/s  router CPU {_num(r.router_cpu_s)} s"
                            + (f"  ERRORS: {' | '.join(r.errors[:3])}" if r.errors else ""),
                            flush=True,
                        )
        if "many" in parts:
            files = small_all.files[:n_many]
            for nofile in (None, LOW_NOFILE):
                print(f"part 2, {n_many} associations, nofile {nofile or 'inherited'}", flush=True)
                m = many(workdir, files, small_all.sop_class_uid, args.timeout, nofile)
                manys.append(m)
                print(
                    f"  accepted {m.accepted}/{m.asked}, stored {m.stored}, delivered "
                    f"{m.delivered}, {_num(m.kib_per_association)} KiB/assoc"
                    + (f"  ERRORS: {' | '.join(m.errors[:3])}" if m.errors else "")
                    + (f"  NOTES: {' | '.join(m.notes[:3])}" if m.notes else ""),
                    flush=True,
                )
        if "queued" in parts:
            print(f"part 3, {n_queued} instances queued", flush=True)
            instances = subset(small_all, workdir / "data" / "queued", n_queued)
            q = queued(workdir, instances, args.timeout)
            print(
                f"  RSS growth {q.rss_bytes_per_instance:.0f} B/instance, disk "
                f"{q.disk_allocated / q.count:.0f} B/instance, delivered {q.delivered}"
                + (f"  ERRORS: {' | '.join(q.errors[:3])}" if q.errors else ""),
                flush=True,
            )
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        elif args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    elapsed = time.perf_counter() - t_start
    hops = summarise_hops(records)
    date = started.strftime("%Y-%m-%d %H:%M %Z")
    load = f"load average {info['loadavg_at_start']} at start, {_loadavg()} at end"
    all_counts = {**counts, "many": n_many, "queued": n_queued}
    print()
    print(line)
    print(render(_text_table, hops, manys, q, all_counts, again))
    print(f"{elapsed:.0f} s ({date}); {load}")
    if args.json is not None:
        data = {
            "machine": info,
            "config": report.run_config(started, load, args.quick, repetitions, elapsed),
            "hop": {
                "summaries": [asdict(s) for s in hops],
                "ratios": [{"label": lb, "values": v} for lb, v in hop_ratios(hops)],
                "runs": [asdict(r) for r in records],
                "failed_and_run_again": [asdict(r) for r in again],
            },
            "many": [asdict(m) | {"kib_per_association": m.kib_per_association} for m in manys],
            "queued": None if q is None else asdict(q),
        }
        args.json.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        body = render(_markdown_table, hops, manys, q, all_counts, again)
        args.markdown.write_text(f"Run {date}. {line}; {load}\n\n{body}")
        print(f"wrote {args.markdown}")
    failed = any(s.errors for s in hops) or any(m.errors for m in manys) or bool(q and q.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
