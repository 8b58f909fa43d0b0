"""The operator's own Prometheus metrics (not the cache servers')."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from cacheoperator.models import Phase

PHASES: tuple[str, ...] = Phase.__args__
RESULTS = ("ok", "invalid", "error")


class _PhaseCollector(Collector):
    """cacheoperator_clusters{phase}: counted at scrape time from the last pass per cluster."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phases: dict[tuple[str, str], str] = {}

    def set(self, key: tuple[str, str], phase: str) -> None:
        with self._lock:
            self._phases[key] = phase

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._phases.pop(key, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            counts = Tally(self._phases.values())
        family = GaugeMetricFamily(
            "cacheoperator_clusters", "CacheClusters by phase, as last reconciled", labels=["phase"]
        )
        for phase in sorted(set(PHASES) | set(counts)):
            family.add_metric([phase], counts.get(phase, 0))
        yield family


class OperatorMetrics:
    """Reconciles by result, how long they take, and clusters by phase."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            "cacheoperator_reconciles",
            "Reconcile passes by result (ok, invalid spec, error)",
            ["result"],
            registry=self.registry,
        )
        # Every result exists from the start at 0: increase() and rate() cannot see the first
        # error of a series that appears with the value 1, and alerts would miss it.
        for result in RESULTS:
            self.reconciles.labels(result=result)
        self.duration = Histogram(
            "cacheoperator_reconcile_duration_seconds",
            "Time of one reconcile pass, API calls included",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self._phases = _PhaseCollector()
        self.registry.register(self._phases)

    def observe_reconcile(self, result: str, seconds: float) -> None:
        self.reconciles.labels(result=result).inc()
        self.duration.observe(seconds)

    def set_phase(self, namespace: str, name: str, phase: str) -> None:
        self._phases.set((namespace, name), phase)

    def forget(self, namespace: str, name: str) -> None:
        self._phases.forget((namespace, name))

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)
