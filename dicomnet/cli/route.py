"""`dicomnet route`: the gateway (receive, match rules, forward through a durable queue),
`route status` (what waits for each destination) and `route retry` (dead letters back)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import anyio

from dicomnet.cli.common import UsageError
from dicomnet.cli.exporter import add_metrics_flags, metrics_observer, start_metrics

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")

# Written by a running router next to its queue, read by `route status`.
STATUS_FILE = ".status.json"
STATUS_EVERY = 2.0  # seconds


def add_parser(sub: Any) -> None:
    route = sub.add_parser(
        "route",
        help="gateway: receive, match rules, forward to destinations through a durable queue",
        description="Run the router of --config; or `status` (per destination: queued, in "
        "flight, dead letters, the oldest copy's age) or `retry DEST` (put the dead letters "
        "of DEST back in its queue) of a queue folder.",
    )
    route.add_argument(
        "action", nargs="?", choices=("status", "retry"), help="status or retry (default: run)"
    )
    route.add_argument("destination", nargs="?", metavar="DEST", help="retry: the destination")
    route.add_argument("--config", metavar="FILE", help="the configuration file (TOML)")
    route.add_argument(
        "--queue", metavar="DIR", help="status, retry: the queue folder (default: --config's)"
    )
    route.add_argument("--json", action="store_true", help="status: one JSON object")
    route.add_argument("-v", "--verbose", action="store_true", help="log each instance")
    route.add_argument("--debug", action="store_true", help="log in detail")
    add_metrics_flags(
        route,
        "associations and operations of both sides, and per destination: queued, oldest "
        "age, in flight, forwarded, retries, dead letters",
        per_worker=False,
    )
    route.set_defaults(run=run)


def _config(args: argparse.Namespace) -> Any:
    from dicomnet.route.config import ConfigError, load_config

    try:
        return load_config(args.config)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _queue_folder(args: argparse.Namespace) -> Path:
    if args.queue:
        folder = Path(args.queue)
    elif args.config:
        folder = _config(args).queue
    else:
        raise UsageError(f"route {args.action}: give --queue DIR (or --config FILE)")
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such queue folder")
    return folder


async def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return status(_queue_folder(args), as_json=args.json)
    if args.action == "retry":
        if not args.destination:
            raise UsageError("route retry: which destination? (route retry DEST --queue DIR)")
        return retry(_queue_folder(args), args.destination)
    if args.destination:
        raise UsageError(f"unexpected {args.destination!r} (route status, route retry DEST)")
    if not args.config:
        raise UsageError("give --config FILE (or: route status / route retry DEST)")
    return await serve(_config(args), args)


def status(folder: Path, *, as_json: bool = False) -> int:
    from dicomnet.route.queue import Queue

    queue = Queue(folder, recover=False)
    live = _live_counts(folder)
    rows: dict[str, dict[str, Any]] = {}
    for name, state in queue.status().items():
        rows[name] = {
            "queued": state.queued,
            "in_flight": live.get(name, {}).get("in_flight") if live else None,
            "held": live.get(name, {}).get("held") if live else None,
            "dead": state.dead,
            "oldest_age_s": None if state.oldest_age is None else round(state.oldest_age, 1),
            "queued_bytes": state.queued_bytes,
            "last_error": live.get(name, {}).get("last_error") or _last_dead_reason(folder / name),
        }
    if as_json:
        print(json.dumps({"queue": str(folder), "running": bool(live), "destinations": rows}))
        return 0
    print(f"queue {folder}: {'a router is running on it' if live else 'no router running'}")
    for name, row in rows.items():
        age = "-" if row["oldest_age_s"] is None else f"{row['oldest_age_s']:.0f} s"
        flight = "-" if row["in_flight"] is None else row["in_flight"]
        held = f" (held for their series / study: {row['held']})" if row["held"] else ""
        print(
            f"  {name}: queued {row['queued']} ({row['queued_bytes'] / 1e6:.1f} MB){held}, "
            f"in flight {flight}, dead letters {row['dead']}, oldest {age}"
        )
        if row["last_error"]:
            print(f"    last error: {row['last_error']}")
    return 0


def _last_dead_reason(destination: Path) -> str | None:
    """Why the latest dead letter was given up (None: there is none)."""
    reasons = sorted((destination / "dead").glob("*.reason"))
    try:
        return reasons[-1].read_text().strip() if reasons else None
    except OSError:
        return None


def _live_counts(folder: Path) -> dict[str, dict[str, Any]]:
    """A running router's counts, when its status file is fresh."""
    try:
        data = json.loads((folder / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if time.time() - float(data.get("time", 0)) > 5 * STATUS_EVERY:
        return {}
    return dict(data.get("destinations", {}))


def retry(folder: Path, destination: str) -> int:
    from dicomnet.route.queue import Queue

    if not (folder / destination / "dead").is_dir():
        raise UsageError(f"{folder}: no destination {destination!r} in this queue")
    moved = Queue(folder, recover=False).retry_dead(destination)
    print(f"{destination}: {moved} dead letter(s) back in the queue")
    return 0


async def serve(config: Any, args: argparse.Namespace) -> int:
    from dicomnet.route.config import ConfigError
    from dicomnet.route.router import Router
    from dicomnet.tls import client_context, server_context

    try:
        tls = (
            server_context(config.tls_cert, config.tls_key, config.tls_ca)
            if config.tls_cert
            else None
        )
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise UsageError(f"listen: TLS: {exc}") from None

    try:
        contexts = {
            d.name: client_context(d.tls_ca, d.tls_cert, d.tls_key)
            for d in config.destinations
            if d.tls
        }
    except (OSError, ValueError) as exc:
        raise UsageError(f"destination TLS: {exc}") from None

    def client_tls(destination: Any) -> Any:
        return contexts.get(destination.name)

    observer = metrics_observer(args, "route")
    try:
        router = Router(config, tls=tls, client_tls=client_tls, observer=observer)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    with contextlib.ExitStack() as exporter:  # the metrics are served until route ends
        metrics = ""
        if observer is not None:
            from dicomnet.route.metrics import RouteCollector

            RouteCollector(router).register(observer.registry)
            url = start_metrics(exporter, observer, args, "route")
            if url is None:
                return 1
            metrics = url
        return await _run(router, config, metrics)


async def _run(router: Any, config: Any, metrics: str) -> int:
    """Serve until SIGINT or SIGTERM."""
    stop = anyio.Event()
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:

            async def on_signals() -> None:
                async for signum in signals:
                    log.info("received signal %d: shutting down", signum)
                    stop.set()

            tg.start_soon(on_signals)
            async with router.serve() as server:
                tg.start_soon(_write_status, router, config.queue)
                names = ", ".join(d.name for d in config.destinations)
                print(
                    f"dicomnet route: {config.aet} listening on {server.host}:{server.port}, "
                    f"queue {config.queue.resolve()}, destinations {names}"
                    + (f", metrics at {metrics}" if metrics else ""),
                    flush=True,
                )
                await stop.wait()
            tg.cancel_scope.cancel()
    return 0


async def _write_status(router: Any, folder: Path) -> None:
    path = folder / STATUS_FILE
    while True:
        data = {
            "time": time.time(),
            "destinations": {
                name: {
                    "in_flight": f.in_flight,
                    "held": f.held,
                    "sent": f.sent,
                    "retried": f.retried,
                    "dead": f.dead,
                    "last_error": f.last_error,
                }
                for name, f in router.forwarders.items()
            },
        }
        temp = path.with_suffix(".tmp")
        temp.write_text(json.dumps(data))
        temp.replace(path)
        await anyio.sleep(STATUS_EVERY)
