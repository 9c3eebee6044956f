"""Entry point: ``python -m benchmarks.run [--quick] [--json PATH] [--markdown PATH]``.

Runs every pairing of scenarios.PAIRINGS on 127.0.0.1, each (pairing, scenario,
repetition) against a freshly started SCP with an empty storage folder, repetitions
interleaved (rep 1 of everything, then rep 2, ...), and prints medians and ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import peers, report
from benchmarks.data import InstanceSet, make_big, make_ct_512k, make_sc_2k, split, subset
from benchmarks.procs import ServerError, ServerProcess, free_port
from benchmarks.scenarios import PAIRINGS, SCENARIOS, Pairing, Scenario

DCMTK_TOOLS = ("echoscu", "storescu", "storescp", "findscu")


# --- machine -------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import dicomnet

    return {
        "loadavg_at_start": _loadavg(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dicomnet": dicomnet.__version__,
        "git": _git_state(),
        "pydicom": version("pydicom"),
        "pynetdicom": version("pynetdicom"),
        "anyio": version("anyio"),
        "uvloop": _version_or_none("uvloop"),
        "dcmtk": peers.dcmtk_version(),
    }


def _version_or_none(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def _git_state() -> str:
    """Commit of the checkout, and whether dicomnet/ differs from it (others edit it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=peers.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dicomnet"],
            cwd=peers.REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + (" + uncommitted changes in dicomnet/" if dirty else "")


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def machine_line(info: dict[str, Any]) -> str:
    return (
        f"Machine: {info['cpu']}, {info['cores']} cores, Linux {info['kernel']}; "
        f"Python {info['python']}; dicomnet {info['dicomnet']} (git {info['git']}), "
        f"pydicom {info['pydicom']}, "
        f"pynetdicom {info['pynetdicom']}, anyio {info['anyio']}, "
        f"uvloop {info.get('uvloop', '?')}, DCMTK {info['dcmtk']}"
    )


# --- one run -------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")


class Runner:
    def __init__(self, workdir: Path, *, quick: bool, timeout: float, keep: bool) -> None:
        self.workdir = workdir
        self.quick = quick
        self.timeout = timeout
        self.keep = keep
        # (data, count), or ("big", -MiB) for the one big instance of S5.
        self.instances: dict[tuple[str, int], InstanceSet] = {}
        self._parts: dict[tuple[str, int], list[InstanceSet]] = {}
        self._received: list[Path] = []  # storage folders left until the end of the run

    def discard_received(self, storage: Path, scenario: Scenario) -> None:
        """Delete what an SCP stored: big instances now (disk space), the many files of
        the other scenarios at the end of the run. On ext4 without a journal, creating a
        file costs a scan over the inodes freed in the last minutes (`recently_deleted()`
        in the inode allocator: 37 us to 1 ms per 2 KB file here), so deleting 2,000 files
        between runs would slow down whichever SCP runs next."""
        if scenario.data == "big":
            shutil.rmtree(storage, ignore_errors=True)
        else:
            self._received.append(storage)

    def cleanup(self) -> None:
        for storage in self._received:
            shutil.rmtree(storage, ignore_errors=True)
        self._received.clear()

    def count(self, pairing: Pairing, scenario: Scenario) -> int:
        if self.quick:
            return pairing.quick_counts.get(scenario.key, scenario.quick_count)
        return pairing.counts.get(scenario.key, scenario.count)

    def size_mib(self, scenario: Scenario) -> int:
        return scenario.quick_size_mib if self.quick else scenario.size_mib

    def associations(self, scenario: Scenario) -> int:
        return scenario.quick_associations if self.quick else scenario.associations

    def instances_for(self, scenario: Scenario, count: int) -> InstanceSet | None:
        if scenario.data is None:
            return None
        if scenario.data == "big":
            return self.instances[(scenario.data, -self.size_mib(scenario))]
        return self.instances[(scenario.data, count)]

    def prepare_data(self, pairings: list[Pairing], scenarios: dict[str, Scenario]) -> None:
        """Generate each data set once, at the largest count needed; subsets are hard links."""
        needed: dict[str, set[int]] = {}
        for pairing in pairings:
            for key in pairing.scenarios:
                scenario = scenarios.get(key)
                if scenario is None or scenario.data is None:
                    continue
                if scenario.data == "big":  # one instance of the scenario's size, made once
                    mib = self.size_mib(scenario)
                    if ("big", -mib) not in self.instances:
                        t0 = time.perf_counter()
                        folder = self.workdir / "data" / f"big-{mib}m"
                        self.instances[("big", -mib)] = make_big(folder, mib)
                        print(
                            f"generated one {mib} MiB instance in {time.perf_counter() - t0:.1f} s",
                            flush=True,
                        )
                    continue
                needed.setdefault(scenario.data, set()).add(self.count(pairing, scenario))
        makers = {"sc2k": make_sc_2k, "ct512k": make_ct_512k}
        for data, counts in needed.items():
            top = max(counts)
            t0 = time.perf_counter()
            full = makers[data](self.workdir / "data" / f"{data}-{top}", top)
            print(
                f"generated {top} {data} instances ({full.mean_dataset_bytes / 1024:.1f} KiB "
                f"data set each) in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            self.instances[(data, top)] = full
            for n in counts - {top}:
                self.instances[(data, n)] = subset(full, self.workdir / "data" / f"{data}-{n}", n)

    def parts(self, instances: InstanceSet, associations: int) -> list[InstanceSet]:
        """S6: `instances` dealt into one folder per association (made once, hard links)."""
        key = (str(instances.folder), associations)
        if key not in self._parts:
            folder = self.workdir / "data" / f"{instances.folder.name}-parts{associations}"
            self._parts[key] = split(instances, folder, associations)
        return self._parts[key]

    def run_one(self, pairing: Pairing, scenario: Scenario, repetition: int) -> report.RunRecord:
        count = self.count(pairing, scenario)
        name = f"{_slug(pairing.key)}-{scenario.key}-r{repetition}"
        storage = self.workdir / "storage" / name
        storage.mkdir(parents=True, exist_ok=True)
        port = free_port()
        argv, env = pairing.scp.command(port, storage, count)
        instances = self.instances_for(scenario, count)
        timeout = max(self.timeout, scenario.min_timeout)
        record = report.RunRecord(
            pairing=pairing.key,
            scenario=scenario.key,
            repetition=repetition,
            count=count,
            seconds=0.0,
            ok=0,
            failed=count,
            rate=0.0,
            mb_per_s=None,
            scu_cpu_seconds=0.0,
            scp_cpu_seconds=None,
            scp_peak_rss_kib=None,
            stored=None,
        )
        server = ServerProcess(
            pairing.scp.label,
            argv,
            port,
            self.workdir / "logs" / f"{name}.log",
            env=env,
            cwd=peers.REPO_ROOT,
            listeners=pairing.scp.listeners,
        )
        if instances is not None:
            quiet_page_cache()
        try:
            with server:
                # Helpers a server starts once listening (dicomnet's indexer process: ~0.7 s
                # of CPU) finish starting before the clock runs; S5-S9 measure RSS growth
                # from there.
                server.settle()
                scu = pairing.scu()
                if scenario.kind == "echo-associations":
                    result = scu.echo_associations(port, count, timeout)
                elif scenario.kind == "echo-one":
                    result = scu.echo_one(port, count, timeout)
                elif scenario.kind == "find":
                    result = scu.find(port, count, timeout)
                elif scenario.kind == "idle":
                    result = scu.idle(port, count, timeout, server)
                elif scenario.kind == "store-concurrent":
                    assert instances is not None
                    parts = self.parts(instances, self.associations(scenario))
                    result = scu.store_concurrent(port, parts, timeout)
                else:
                    assert instances is not None
                    result = scu.store_one(port, instances, timeout)
                server.wait_quiet()  # work it does after the last answer counts too
                scp_cpu, rss = server.measure()
                if server.baseline is not None:
                    # Peak RSS over the run minus RSS once listening (S5: must stay flat).
                    growth = (rss - server.baseline.rss_kib) / 1024
                    result.extra["scp_rss_growth_mib"] = growth
            record = replace(
                record,
                seconds=result.seconds,
                ok=result.ok,
                failed=result.failed,
                rate=result.ok / result.seconds if result.seconds > 0 else 0.0,
                scu_cpu_seconds=result.cpu_seconds,
                scp_cpu_seconds=scp_cpu,
                scp_peak_rss_kib=rss,
                errors=list(result.errors),
                extra=dict(result.extra),
            )
            if instances is not None:
                record.stored = peers.count_stored(storage)
                if record.stored != count:
                    record.errors.append(f"SCP stored {record.stored} of {count} instances")
                if result.seconds > 0:
                    done = instances.dataset_bytes * result.ok / count
                    record.mb_per_s = done / result.seconds / 1e6
            if server.returncode() not in (None, 0, -signal.SIGTERM):
                record.errors.append(f"SCP exit status {server.returncode()}")
        except ServerError as exc:
            record.errors.append(f"SCP: {exc}")
        finally:
            server.stop()
            record.scp_log_issues = server.log_issues()
            if not self.keep:
                self.discard_received(storage, scenario)
        unit = scenario.unit
        extra = f", {record.mb_per_s:.1f} MB/s" if scenario.megabytes and record.mb_per_s else ""
        extra += "".join(
            f", {k} {record.extra[k]:.1f}" for k in scenario.extras if k in record.extra
        )
        print(
            f"  {scenario.key} {pairing.key:34s} rep {repetition}: {record.rate:9.1f} {unit}"
            f"{extra} ({record.ok}/{count} ok in {record.seconds:.2f} s)"
            + (f"  ERRORS: {' | '.join(record.errors[:3])}" if record.errors else "")
            + (
                f"  SCP LOG: {' | '.join(record.scp_log_issues[:3])}"
                if record.scp_log_issues
                else ""
            ),
            flush=True,
        )
        return record


def quiet_page_cache() -> None:
    """Write back what earlier runs left dirty in the page cache, so that a run storing
    files does not pay for the one before it (S4: 150 MB a run, S5: 256 MiB)."""
    if hasattr(os, "sync"):
        os.sync()


# --- main ----------------------------------------------------------------------------------


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Turn SIGTERM into an exception so that every `finally` stops its server.
    raise KeyboardInterrupt(f"signal {signum}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="dicomnet vs pynetdicom vs DCMTK on 127.0.0.1 (see benchmarks/README.md)",
    )
    parser.add_argument("--quick", action="store_true", help="1 repetition, small counts")
    parser.add_argument("--repetitions", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write JSON")
    parser.add_argument(
        "--markdown", type=Path, default=None, metavar="PATH", help="write a markdown table"
    )
    parser.add_argument(
        "--scenario", action="append", default=None, choices=list(SCENARIOS), help="only these"
    )
    parser.add_argument(
        "--pairing",
        action="append",
        default=None,
        choices=[p.key for p in PAIRINGS],
        help="only these pairings (repeatable)",
    )
    parser.add_argument(
        "--timeout", type=float, default=300.0, help="limit for one client run, seconds (300)"
    )
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--keep", action="store_true", help="keep data, storage and SCP logs")
    parser.add_argument(
        "--huge",
        action="store_true",
        help="also S5-2G: one 2 GiB C-STORE, dicomnet pair only (needs ~4.5 GiB of disk)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    repetitions = args.repetitions or (1 if args.quick else 3)
    scenarios = {
        k: s
        for k, s in SCENARIOS.items()
        if (k in args.scenario if args.scenario is not None else not s.optional)
        or (args.huge and s.optional)
    }
    pairings = [p for p in PAIRINGS if args.pairing is None or p.key in args.pairing]
    missing = [t for t in DCMTK_TOOLS if shutil.which(peers.dcmtk(t)) is None]
    if missing:
        print(f"DCMTK tools missing ({', '.join(missing)}): skipping the DCMTK pairings")
        pairings = [
            p
            for p in pairings
            if not isinstance(p.scu(), peers.DcmtkSCU) and not p.scp.key.startswith("storescp")
        ]
    # Import the libraries before anything is timed.
    import anyio  # noqa: F401
    import pynetdicom  # noqa: F401

    import dicomnet  # noqa: F401

    info = machine_info()
    line = machine_line(info)
    print(line, flush=True)
    started = datetime.now(timezone.utc).astimezone()
    t_start = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dicomnet-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    runner = Runner(workdir, quick=args.quick, timeout=args.timeout, keep=args.keep)
    records: list[report.RunRecord] = []
    try:
        runner.prepare_data(pairings, scenarios)
        for rep in range(1, repetitions + 1):
            print(f"repetition {rep} of {repetitions}", flush=True)
            for pairing in pairings:
                if pairing.repetitions is not None and rep > pairing.repetitions:
                    continue
                for key in pairing.scenarios:
                    scenario = scenarios.get(key)
                    if scenario is None:
                        continue
                    if scenario.repetitions is not None and rep > scenario.repetitions:
                        continue
                    records.append(runner.run_one(pairing, scenario, rep))
    except KeyboardInterrupt:
        print("interrupted: reporting what was measured", file=sys.stderr)
    finally:
        if not args.keep:
            runner.cleanup()
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep:
            print(f"kept {workdir}")
    elapsed = time.perf_counter() - t_start
    summaries = report.summarise(records)
    date = started.strftime("%Y-%m-%d %H:%M %Z")
    print()
    print(report.render_text(line, summaries))
    print(f"\n{len(records)} runs in {elapsed:.0f} s ({date})")
    load = f"load average {info['loadavg_at_start']} at start, {_loadavg()} at end"
    print(load)
    config = report.run_config(started, load, args.quick, repetitions, elapsed)
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_json(info, config, records), indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(report.render_markdown(f"{line}; {load}", date, summaries))
        print(f"wrote {args.markdown}")
    failed = sum(1 for r in records if r.failed or r.errors)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
