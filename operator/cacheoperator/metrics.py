"""The operator's own Prometheus metrics (not the cache servers')."""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

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


@dataclass(frozen=True)
class _ClusterView:
    """What the last pass of one cluster said about its rollout and its appliances."""

    rolling: bool  # its pod template is being rolled out (Progressing: RollingOut)
    replicas: int  # appliances the spec asks for
    updated: int  # appliances ready on the current template
    timed_out: int  # StatefulSets the rollout went on without
    restored: tuple[tuple[str, int], ...]  # (pod, items its last start restored)


def cluster_view(status: Mapping[str, Any]) -> _ClusterView:
    """The metrics' reading of a status a pass wrote (as stored: camelCase)."""
    rollout = status.get("rollout") or {}
    progressing = next(
        (c for c in status.get("conditions") or [] if c.get("type") == "Progressing"), {}
    )
    return _ClusterView(
        rolling=progressing.get("reason") == "RollingOut",
        replicas=int(rollout.get("replicas") or 0),
        updated=int(rollout.get("updatedReplicas") or 0),
        timed_out=len(rollout.get("timedOut") or []),
        restored=tuple(
            (a["pod"], int(a.get("restoredItems") or 0))
            for a in status.get("appliances") or []
            if a.get("warmRestart") in ("restored", "none", "refused")
        ),
    )


class _ClusterCollector(Collector):
    """Per CacheCluster, at scrape time from the last pass: where its rollout is, and what
    each appliance restored at its start. Labels namespace and cachecluster are the
    CacheCluster's (and pod the appliance's), as on the appliances' own series, so a
    dashboard can put both in one panel; the chart's ServiceMonitor honours them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._views: dict[tuple[str, str], _ClusterView] = {}

    def set(self, key: tuple[str, str], view: _ClusterView) -> None:
        with self._lock:
            self._views[key] = view

    def forget(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._views.pop(key, None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            views = sorted(self._views.items())
        labels = ["namespace", "cachecluster"]
        rolling = GaugeMetricFamily(
            "cacheoperator_rollout_in_progress",
            "1 while the CacheCluster's pod template is being rolled out, else 0",
            labels=labels,
        )
        progress = GaugeMetricFamily(
            "cacheoperator_rollout_progress",
            "Share of the CacheCluster's appliances that run the current pod template and "
            "are ready (0 to 1; 1 when none is asked for)",
            labels=labels,
        )
        updated = GaugeMetricFamily(
            "cacheoperator_rollout_updated_appliances",
            "Appliances that run the current pod template and are ready",
            labels=labels,
        )
        timed_out = GaugeMetricFamily(
            "cacheoperator_rollout_timed_out_statefulsets",
            "StatefulSets the current rollout went on without after its deadline",
            labels=labels,
        )
        restored = GaugeMetricFamily(
            "cacheoperator_appliance_restored_items",
            "Items each ready appliance restored from its warm-restart snapshot at its last "
            "start (0: none or refused), as it reported",
            labels=[*labels, "pod"],
        )
        for (namespace, name), view in views:
            key = [namespace, name]
            rolling.add_metric(key, 1 if view.rolling else 0)
            progress.add_metric(key, view.updated / view.replicas if view.replicas else 1.0)
            updated.add_metric(key, view.updated)
            timed_out.add_metric(key, view.timed_out)
            for pod, items in view.restored:
                restored.add_metric([*key, pod], items)
        yield from (rolling, progress, updated, timed_out, restored)


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
        self._clusters = _ClusterCollector()
        self.registry.register(self._clusters)

    def observe_reconcile(self, result: str, seconds: float) -> None:
        self.reconciles.labels(result=result).inc()
        self.duration.observe(seconds)

    def set_phase(self, namespace: str, name: str, phase: str) -> None:
        self._phases.set((namespace, name), phase)

    def set_cluster(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Its rollout and appliances, from the status a pass wrote."""
        self._clusters.set((namespace, name), cluster_view(status))

    def forget(self, namespace: str, name: str) -> None:
        self._phases.forget((namespace, name))
        self._clusters.forget((namespace, name))

    def serve(self, port: int, address: str = "0.0.0.0") -> None:
        start_http_server(port, addr=address, registry=self.registry)
