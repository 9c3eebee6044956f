"""`--metrics-port` and `--metrics-host` of `serve` and `route`: a Prometheus observer
and its exporter (prometheus_client, the `metrics` extra)."""

from __future__ import annotations

import argparse
import contextlib
import sys
from typing import Any

__all__ = ["add_metrics_flags", "metrics_observer", "start_metrics"]


def add_metrics_flags(parser: argparse.ArgumentParser, what: str, per_worker: bool) -> None:
    group = parser.add_argument_group("metrics")
    workers = (
        "; with --workers N, process k (0 to N-1) serves its own on port P+k" if per_worker else ""
    )
    group.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="P",
        help=f"serve Prometheus metrics at http://HOST:P/metrics ({what}){workers}. "
        "Needs prometheus_client (dicomnet[metrics])",
    )
    group.add_argument(
        "--metrics-host",
        default="127.0.0.1",
        metavar="H",
        help="address the metrics are served on (127.0.0.1)",
    )


def metrics_observer(args: argparse.Namespace, command: str) -> Any:
    """The Prometheus observer `--metrics-port` asks for (None without it)."""
    if args.metrics_port is None:
        return None
    # An extra, not a dependency: the library and the other commands never need it.
    try:
        from dicomnet.metrics import PrometheusObserver
    except ImportError:
        raise SystemExit(
            f"dicomnet {command}: --metrics-port needs the prometheus_client package "
            "(pip install 'dicomnet[metrics]')"
        ) from None
    return PrometheusObserver()


def start_metrics(
    exporter: contextlib.ExitStack, observer: Any, args: argparse.Namespace, command: str
) -> str | None:
    """Serve the observer's metrics (worker k on --metrics-port + k): the URL, or None
    after the one-line error of a port that cannot be listened on."""
    from dicomnet.metrics import serve_metrics

    host, port = args.metrics_host, args.metrics_port + (getattr(args, "worker_slot", 0) or 0)
    try:
        host, port = exporter.enter_context(serve_metrics(observer.registry, host, port))
    except OSError as exc:
        print(
            f"dicomnet {command}: cannot serve metrics on {host}:{port}: "
            f"{exc.strerror or exc} (another server on that port? choose one with "
            "--metrics-port)",
            file=sys.stderr,
        )
        return None
    return f"http://{host}:{port}/metrics"
