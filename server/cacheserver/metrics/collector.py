"""Prometheus collector: reads the worker's plain counters at scrape time.

Metric names follow prometheus/memcached_exporter where the meaning is the same, so existing
dashboards and alerts work; the appliance's own metrics live under ``cacheappliance_``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cacheserver.metrics.latency import LatencyHistogram
from cacheserver.metrics.stats_report import StatsReport

# (command label, status label, counter field) as memcached_exporter reports them.
COMMANDS = (
    ("get", "hit", "get_hits"),
    ("get", "miss", "get_misses"),
    ("set", "hit", "cmd_set"),
    ("cas", "hit", "cas_hits"),
    ("cas", "miss", "cas_misses"),
    ("cas", "badval", "cas_badval"),
    ("delete", "hit", "delete_hits"),
    ("delete", "miss", "delete_misses"),
    ("incr", "hit", "incr_hits"),
    ("incr", "miss", "incr_misses"),
    ("decr", "hit", "decr_hits"),
    ("decr", "miss", "decr_misses"),
    ("touch", "hit", "touch_hits"),
    ("touch", "miss", "touch_misses"),
    ("flush", "hit", "cmd_flush"),
)


class ServerCollector(Collector):
    def __init__(self, report: StatsReport, latency: LatencyHistogram | None = None) -> None:
        self._report = report
        self._latency = latency
        # Other layers (memory sizing, the shrinker) add their own metric families here.
        self.extra: list[Callable[[], Iterator[Metric]]] = []

    def collect(self) -> Iterator[Metric]:
        report = self._report
        c = report.counters
        store = report.store
        s = store.stats

        yield GaugeMetricFamily("memcached_up", "Whether the server answers.", value=1)
        yield GaugeMetricFamily(
            "memcached_uptime_seconds", "Seconds since start.", value=time.time() - report.started
        )
        info = InfoMetricFamily("memcached_version", "The server's version.")
        info.add_metric([], {"version": report.version})
        yield info

        commands = CounterMetricFamily(
            "memcached_commands", "Commands by command and result.", labels=["command", "status"]
        )
        for command, status, field in COMMANDS:
            commands.add_metric([command, status], getattr(c, field))
        yield commands

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, value=value)

        yield gauge("memcached_current_items", "Items stored.", store.curr_items)
        yield counter("memcached_items", "Items ever stored.", s.total_items)
        yield gauge("memcached_current_bytes", "Bytes the items take.", store.bytes_used)
        yield gauge("memcached_limit_bytes", "Bytes the cache may hold.", store.capacity)
        yield counter(
            "memcached_items_evicted",
            "Valid items evicted to make room.",
            s.evictions + s.evictions_shrinker,
        )
        yield counter("memcached_items_reclaimed", "Expired items reclaimed.", s.reclaimed)
        yield gauge("memcached_current_connections", "Open connections.", c.curr_connections)
        yield gauge(
            "memcached_max_connections", "The connection limit.", report.settings.conn_limit
        )
        yield counter("memcached_connections", "Connections accepted.", c.total_connections)
        yield counter(
            "memcached_connections_rejected",
            "Connections refused at the limit.",
            c.rejected_connections,
        )
        yield counter("memcached_read_bytes", "Bytes read from clients.", c.bytes_read)
        yield counter("memcached_written_bytes", "Bytes written to clients.", c.bytes_written)

        evictions = CounterMetricFamily(
            "cacheappliance_evictions", "Valid items evicted, by cause.", labels=["cause"]
        )
        evictions.add_metric(["capacity"], s.evictions)
        evictions.add_metric(["shrinker"], s.evictions_shrinker)
        yield evictions
        drops = CounterMetricFamily(
            "cacheappliance_udp_dropped_datagrams", "UDP datagrams dropped.", labels=["reason"]
        )
        drops.add_metric(["malformed"], c.udp_dropped_malformed)
        drops.add_metric(["multi_datagram_request"], c.udp_dropped_multidatagram)
        drops.add_metric(["send_error"], c.udp_send_errors)
        yield drops
        yield counter(
            "cacheappliance_udp_refused_commands",
            "Commands refused over UDP by the amplification guard.",
            c.udp_refused_commands,
        )
        if self._latency is not None:
            hist = HistogramMetricFamily(
                "cacheappliance_request_duration_seconds",
                "Server time to handle one read's requests, sampled 1 in 64 reads.",
                buckets=self._latency.cumulative(),
                sum_value=self._latency.sum_seconds,
            )
            yield hist
        for extra in self.extra:
            yield from extra()
