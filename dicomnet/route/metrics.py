"""The router's own metrics, beside those of its `PrometheusObserver`: what waits for
each destination and what became of what was received (read when scraped).

| metric | type | what |
|---|---|---|
| `dicomnet_route_received_total{outcome}` | counter | instances received, by outcome (*) |
| `dicomnet_route_queued{destination}` | gauge | copies waiting (in flight included) |
| `dicomnet_route_queued_bytes{destination}` | gauge | their size |
| `dicomnet_route_oldest_age_seconds{destination}` | gauge | the oldest copy's wait (0: none) |
| `dicomnet_route_in_flight{destination}` | gauge | copies being sent |
| `dicomnet_route_dead_letters{destination}` | gauge | copies in the dead-letter folder |
| `dicomnet_route_forwarded_total{destination}` | counter | copies the destination confirmed |
| `dicomnet_route_retries_total{destination}` | counter | failed sends to be tried again |
| `dicomnet_route_dead_lettered_total{destination}` | counter | copies given up since the start |

(*) queued, dropped (by a rule), unrouted, full (refused 0xA700), failed (a disk error),
invalid (refused: it does not parse or its UIDs are not the request's).

Needs the `prometheus_client` package (`dicomnet[metrics]`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

if TYPE_CHECKING:
    from dicomnet.route.router import Router

log = logging.getLogger("dicomnet")

__all__ = ["RouteCollector"]

OUTCOMES = ("queued", "dropped", "unrouted", "full", "failed", "invalid")


class RouteCollector(Collector):
    """Collects a router's queue and forwarding figures; `register(registry)` adds it."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def register(self, registry: CollectorRegistry) -> RouteCollector:
        registry.register(self)
        return self

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        received = CounterMetricFamily(
            "dicomnet_route_received", "Instances received, by outcome", labels=["outcome"]
        )
        outcomes = self.router.intake.outcomes
        for outcome in OUTCOMES:
            received.add_metric([outcome], outcomes[outcome])
        yield received
        yield from self._destinations()

    def _destinations(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        label = ["destination"]
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "queued": GaugeMetricFamily(
                "dicomnet_route_queued", "Copies waiting (in flight included)", labels=label
            ),
            "queued_bytes": GaugeMetricFamily(
                "dicomnet_route_queued_bytes", "Bytes of the copies waiting", labels=label
            ),
            "oldest": GaugeMetricFamily(
                "dicomnet_route_oldest_age_seconds",
                "Age of the oldest copy waiting (0: none)",
                labels=label,
            ),
            "in_flight": GaugeMetricFamily(
                "dicomnet_route_in_flight", "Copies being sent", labels=label
            ),
            "dead": GaugeMetricFamily(
                "dicomnet_route_dead_letters", "Copies in the dead-letter folder", labels=label
            ),
            "forwarded": CounterMetricFamily(
                "dicomnet_route_forwarded", "Copies the destination confirmed", labels=label
            ),
            "retries": CounterMetricFamily(
                "dicomnet_route_retries", "Failed sends to be tried again", labels=label
            ),
            "dead_lettered": CounterMetricFamily(
                "dicomnet_route_dead_lettered", "Copies given up since the start", labels=label
            ),
        }
        forwarders = self.router.forwarders
        try:
            statuses = self.router.queue.status()
        except OSError as exc:  # a shared queue's database not there: no queue figures
            log.warning("metrics: the queue's status: %s", exc)
            return
        for name, state in statuses.items():
            forwarder = forwarders.get(name)
            figures = {
                "queued": state.queued,
                "queued_bytes": state.queued_bytes,
                "oldest": state.oldest_age or 0.0,
                "dead": state.dead,
                "in_flight": forwarder.in_flight if forwarder else 0,
                "forwarded": forwarder.sent if forwarder else 0,
                "retries": forwarder.retried if forwarder else 0,
                "dead_lettered": forwarder.dead if forwarder else 0,
            }
            for key, family in families.items():
                family.add_metric([name], figures[key])
        yield from families.values()
