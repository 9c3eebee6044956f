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
STATUS_FOLDER = ".status"  # one file a node, when nodes share the queue
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


def _queue(args: argparse.Namespace) -> tuple[Path, Any]:
    """The queue folder, and the queue to look at: --config's (its database too, if it
    has one), or the folder of --queue."""
    from dicomnet.route.queue import Queue

    if args.config:
        from dataclasses import replace

        from dicomnet.route.config import ConfigError
        from dicomnet.route.router import open_queue

        config = _config(args)
        if args.queue:
            config = replace(config, queue=Path(args.queue))
        if not config.queue.is_dir():
            raise UsageError(f"{config.queue}: no such queue folder")
        try:
            return config.queue, open_queue(config, running=False)
        except ConfigError as exc:
            raise UsageError(str(exc)) from None
    if not args.queue:
        raise UsageError(f"route {args.action}: give --queue DIR (or --config FILE)")
    folder = Path(args.queue)
    if not folder.is_dir():
        raise UsageError(f"{folder}: no such queue folder")
    return folder, Queue(folder, recover=False)


async def run(args: argparse.Namespace) -> int:
    if args.action == "status":
        return status(*_queue(args), as_json=args.json)
    if args.action == "retry":
        if not args.destination:
            raise UsageError("route retry: which destination? (route retry DEST --queue DIR)")
        return retry(*_queue(args), args.destination)
    if args.destination:
        raise UsageError(f"unexpected {args.destination!r} (route status, route retry DEST)")
    if not args.config:
        raise UsageError("give --config FILE (or: route status / route retry DEST)")
    return await serve(_config(args), args)


def status(folder: Path, queue: Any, *, as_json: bool = False) -> int:
    live = _live_counts(folder)
    rows: dict[str, dict[str, Any]] = {}
    for name, state in queue.status().items():
        counts = live.get(name, {})
        rows[name] = {
            "queued": state.queued,
            "in_flight": counts.get("in_flight") if live else None,
            "held": counts.get("held") if live else None,
            "dead": state.dead,
            "oldest_age_s": None if state.oldest_age is None else round(state.oldest_age, 1),
            "queued_bytes": state.queued_bytes,
            "last_error": counts.get("last_error") or queue.last_reason(name),
        }
    queue.close()
    running = f"{len(live_nodes(folder))} router(s) running on it" if live else "no router running"
    if as_json:
        print(json.dumps({"queue": str(folder), "running": bool(live), "destinations": rows}))
        return 0
    print(f"queue {folder}: {running}")
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


def status_file(folder: Path, node: str | None) -> Path:
    """Where a running router writes its counts: beside its queue, or, for one of the
    nodes sharing a queue, in a file of its own."""
    if node is None:
        return folder / STATUS_FILE
    from dicomnet.database import node_folder

    return folder / STATUS_FOLDER / f"{node_folder(node)}.json"


def live_nodes(folder: Path) -> list[dict[str, Any]]:
    """The counts of the routers running on the queue in `folder` (fresh status files)."""
    found = []
    for path in [folder / STATUS_FILE, *sorted((folder / STATUS_FOLDER).glob("*.json"))]:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if time.time() - float(data.get("time", 0)) <= 5 * STATUS_EVERY:
            found.append(data)
    return found


def _live_counts(folder: Path) -> dict[str, dict[str, Any]]:
    """Per destination, the running routers' counts summed (the latest error of any)."""
    out: dict[str, dict[str, Any]] = {}
    for data in live_nodes(folder):
        for name, counts in dict(data.get("destinations", {})).items():
            row = out.setdefault(name, {"in_flight": 0, "held": 0, "last_error": None})
            row["in_flight"] += counts.get("in_flight") or 0
            row["held"] += counts.get("held") or 0
            row["last_error"] = counts.get("last_error") or row["last_error"]
    return out


def retry(folder: Path, queue: Any, destination: str) -> int:
    if destination not in queue.status():
        raise UsageError(f"{folder}: no destination {destination!r} in this queue")
    moved = queue.retry_dead(destination)
    queue.close()
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
                path = status_file(config.queue, router.node)
                tg.start_soon(_write_status, router, path)
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


async def _write_status(router: Any, path: Path) -> None:
    path.parent.mkdir(exist_ok=True)
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
