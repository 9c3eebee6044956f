"""Prometheus metrics: an `Observer` counting into a registry of its own, and its exporter.

`PrometheusObserver()` is given to `AE(observer=...)` or `connect(observer=...)`;
`serve_metrics(observer.registry, host, port)` serves the text exposition format on
http://host:port/metrics from a thread (prometheus_client's), until its block ends.
Each observer has its own `CollectorRegistry`, not prometheus_client's global one, so
two in one process never collide. The metrics (labels in braces):

| metric | type | what |
|---|---|---|
| `dicomnet_associations_active{role}` | gauge | associations open (requestor / acceptor) |
| `dicomnet_associations_total{role,outcome}` | counter | ended: released, aborted, rejected |
| `dicomnet_associations_rejected_total{role,result,source,reason}` | counter | PS3.8 Table 9-21 |
| `dicomnet_operations_total{service,command,role,category,status}` | counter | final status |
| `dicomnet_operations_in_progress{command,role}` | gauge | operations begun, not finished |
| `dicomnet_operation_duration_seconds{command,role}` | histogram | request to final response |
| `dicomnet_received_bytes_total{command,role}` | counter | data set bytes received |
| `dicomnet_sent_bytes_total{command,role}` | counter | data set bytes sent |

`role` is SCU for an operation we invoked, SCP for one we performed; `category` is
success, warning, failure or cancel, and `status` the final status in hex (0xC000);
an operation left without a final response (the association ended) is category and
status `none`. `service` is the service of the SOP class (echo, store, find, move,
get, worklist, commitment, mpps, n-services).

Needs the `prometheus_client` package: `pip install "dicomnet[metrics]"`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import start_http_server

from dicomnet.access import service_of
from dicomnet.observe import ObservedAssociation, ObservedOperation, Observer
from dicomnet.status import Status

__all__ = ["LATENCY_BUCKETS", "PrometheusObserver", "serve_metrics"]

# Seconds: from an echo on loopback (well under a millisecond) to a long C-MOVE.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


def _status_labels(status: int | None) -> tuple[str, str]:
    """(category, status as 0xHHHH) of a final status; ('none', 'none') without one."""
    if status is None:
        return "none", "none"
    return Status(status).category.value.lower(), f"0x{status:04X}"


class PrometheusObserver(Observer):
    """Counts associations and operations into `registry` (a new one by default)."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        buckets: tuple[float, ...] = LATENCY_BUCKETS,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.associations_active = Gauge(
            "dicomnet_associations_active", "Associations open", ["role"], registry=r
        )
        self.associations = Counter(
            "dicomnet_associations",
            "Associations ended (released, aborted) or rejected",
            ["role", "outcome"],
            registry=r,
        )
        self.rejected = Counter(
            "dicomnet_associations_rejected",
            "Association requests rejected, by result, source and reason (PS3.8 Table 9-21)",
            ["role", "result", "source", "reason"],
            registry=r,
        )
        self.operations = Counter(
            "dicomnet_operations",
            "DIMSE operations finished, by final status",
            ["service", "command", "role", "category", "status"],
            registry=r,
        )
        self.in_progress = Gauge(
            "dicomnet_operations_in_progress",
            "DIMSE operations begun and not finished",
            ["command", "role"],
            registry=r,
        )
        self.duration = Histogram(
            "dicomnet_operation_duration_seconds",
            "DIMSE operations: request to final response",
            ["command", "role"],
            buckets=buckets,
            registry=r,
        )
        self.received = Counter(
            "dicomnet_received_bytes",
            "Data set bytes received with DIMSE messages",
            ["command", "role"],
            registry=r,
        )
        self.sent = Counter(
            "dicomnet_sent_bytes",
            "Data set bytes sent with DIMSE messages",
            ["command", "role"],
            registry=r,
        )
        # Label sets seen -> their children: `labels()` takes a lock and builds a key.
        self._by_operation: dict[tuple[str, str], tuple[Any, Any, Any, Any]] = {}
        self._by_outcome: dict[tuple[str, str, str, int | None], Any] = {}

    def text(self) -> bytes:
        """The metrics in the Prometheus text exposition format."""
        return generate_latest(self.registry)

    # --- Observer --------------------------------------------------------------------------

    def association_opened(self, association: ObservedAssociation) -> None:
        self.associations_active.labels(association.role).inc()

    def association_closed(self, association: ObservedAssociation) -> None:
        role = association.role
        self.associations.labels(role, association.outcome).inc()
        if association.rejection is not None:
            self.rejected.labels(role, *map(str, association.rejection)).inc()
        else:
            self.associations_active.labels(role).dec()

    def _children(self, operation: ObservedOperation) -> tuple[Any, Any, Any, Any]:
        key = (operation.command, operation.role)
        children = self._by_operation.get(key)
        if children is None:
            children = (
                self.in_progress.labels(*key),
                self.duration.labels(*key),
                self.received.labels(*key),
                self.sent.labels(*key),
            )
            self._by_operation[key] = children
        return children

    def operation_started(self, operation: ObservedOperation) -> None:
        self._children(operation)[0].inc()

    def operation_finished(self, operation: ObservedOperation) -> None:
        in_progress, duration, received, sent = self._children(operation)
        in_progress.dec()
        duration.observe(operation.duration)
        if operation.bytes_in:
            received.inc(operation.bytes_in)
        if operation.bytes_out:
            sent.inc(operation.bytes_out)
        key = (operation.sop_class_uid, operation.command, operation.role, operation.status)
        counter = self._by_outcome.get(key)
        if counter is None:
            category, status = _status_labels(operation.status)
            service = service_of(operation.sop_class_uid)
            counter = self.operations.labels(
                service, operation.command, operation.role, category, status
            )
            self._by_outcome[key] = counter
        counter.inc()


@contextmanager
def serve_metrics(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 9464
) -> Iterator[tuple[str, int]]:
    """Serve `registry` at http://host:port/metrics (a thread) until the block ends;
    yields the address listened on (port 0: one the system chose). An address in use
    raises `OSError` before the block runs."""
    server, thread = start_http_server(port, host, registry)
    try:
        yield str(server.server_address[0]), int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
