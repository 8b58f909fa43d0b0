"""Metrics of a multi-worker server, gathered from the workers when Prometheus scrapes.

The parent holds no counters of its own: on each scrape it asks every worker for ``stats``
on the worker's admin socket (a Unix socket that answers ``version`` and ``stats`` without
authentication or TLS, so this works with -Y and -Z too; the same numbers a client sees) and
reports each worker's series with a ``worker`` label. Nothing is shared between processes,
nothing locks.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cacheserver.config import Settings, worker_path
from cacheserver.metrics.collector import COMMANDS
from cacheserver.metrics.http import serve_metrics
from cacheserver.metrics.identity import PodIdentity
from cacheserver.metrics.latency import histogram_from_stats

# (metric, help, kind, stats field); the command counters follow collector.COMMANDS.
_SERIES = (
    ("memcached_current_items", "Items stored.", "gauge", "curr_items"),
    ("memcached_items", "Items ever stored.", "counter", "total_items"),
    ("memcached_current_bytes", "Bytes the items take.", "gauge", "bytes"),
    ("memcached_limit_bytes", "Bytes the cache may hold.", "gauge", "limit_maxbytes"),
    ("memcached_items_evicted", "Valid items evicted to make room.", "counter", "evictions"),
    ("memcached_items_reclaimed", "Expired items reclaimed.", "counter", "reclaimed"),
    ("memcached_current_connections", "Open connections.", "gauge", "curr_connections"),
    ("memcached_connections", "Connections accepted.", "counter", "total_connections"),
    ("memcached_max_connections", "The connection limit.", "gauge", "max_connections"),
    (
        "memcached_connections_rejected",
        "Connections refused at the limit.",
        "counter",
        "rejected_connections",
    ),
    (
        "cacheappliance_udp_refused_commands",
        "Commands refused over UDP by the amplification guard.",
        "counter",
        "udp_refused_commands",
    ),
    ("cacheappliance_auth_commands", "Logins tried (-Y), right or wrong.", "counter", "auth_cmds"),
    (
        "cacheappliance_auth_errors",
        "Logins refused (-Y): wrong user or password.",
        "counter",
        "auth_errors",
    ),
    (
        "cacheappliance_tls_handshake_errors",
        "TLS handshakes that failed: plaintext clients, refused client certificates.",
        "counter",
        "ssl_handshake_errors",
    ),
    ("memcached_read_bytes", "Bytes read from clients.", "counter", "bytes_read"),
    ("memcached_written_bytes", "Bytes written to clients.", "counter", "bytes_written"),
    ("memcached_uptime_seconds", "Seconds since start.", "gauge", "uptime"),
    # The memory layer's own numbers (cacheserver.memory), as a single worker reports them.
    ("cacheappliance_memory_limit_bytes", "The memory limit sized to.", "gauge", "memory_limit"),
    ("cacheappliance_memory_working_set_bytes", "Working set.", "gauge", "memory_working_set"),
    ("cacheappliance_memory_resident_bytes", "Resident memory.", "gauge", "memory_resident"),
    (
        "cacheappliance_memory_shrink_events",
        "Times the shrinker evicted.",
        "counter",
        "memory_shrink_events",
    ),
    (
        "cacheappliance_memory_shrinker_released_bytes",
        "Bytes of items the shrinker evicted.",
        "counter",
        "memory_bytes_released",
    ),
    # Auto discovery (cacheserver.discovery), when the server has a membership file.
    (
        "cacheappliance_cluster_config_version",
        "Version of the cluster membership served (0: none yet).",
        "gauge",
        "cluster_config_version",
    ),
    (
        "cacheappliance_cluster_config_nodes",
        "Endpoints in the cluster membership served.",
        "gauge",
        "cluster_config_nodes",
    ),
    (
        "cacheappliance_cluster_config_age_seconds",
        "Seconds since the cluster membership last changed.",
        "gauge",
        "cluster_config_age",
    ),
    (
        "cacheappliance_cluster_config_lag_seconds",
        "Seconds from a membership change to serving it here.",
        "gauge",
        "cluster_config_lag",
    ),
    (
        "cacheappliance_cluster_config_load_errors",
        "Membership files that could not be read or parsed.",
        "counter",
        "cluster_config_load_errors",
    ),
    (
        "cacheappliance_cluster_config_requests",
        "config get cluster and get AmazonElastiCache:cluster requests answered.",
        "counter",
        "cluster_config_requests",
    ),
    # Warm restart (-e), as cacheserver.warm reports it.
    (
        "cacheappliance_warm_restart_restored_items",
        "Items restored from the snapshot at start.",
        "gauge",
        "warm_restart_restored_items",
    ),
    (
        "cacheappliance_warm_restart_restored_bytes",
        "Bytes of keys and items restored at start.",
        "gauge",
        "warm_restart_restored_bytes",
    ),
    (
        "cacheappliance_warm_restart_restore_seconds",
        "Seconds the restore took.",
        "gauge",
        "warm_restart_restore_seconds",
    ),
)
# Families with one label besides the worker: (metric, help, label, ((value, field), ...)).
_LABELLED = (
    (
        "cacheappliance_evictions",
        "Valid items evicted, by cause.",
        "cause",
        (("capacity", "evictions_capacity"), ("shrinker", "evictions_shrinker")),
    ),
    (
        "cacheappliance_udp_dropped_datagrams",
        "UDP datagrams dropped.",
        "reason",
        (
            ("malformed", "udp_dropped_malformed"),
            ("multi_datagram_request", "udp_dropped_multidatagram"),
            ("send_error", "udp_send_errors"),
        ),
    ),
)


def fetch_stats(host: str, port: int, timeout: float = 2.0) -> dict[str, str] | None:
    """``stats`` of one worker over TCP as a dict, or None when it does not answer."""
    reply = ask(lambda: socket.create_connection((host, port), timeout=timeout), b"stats")
    return parse_stats(reply) if reply is not None else None


def fetch_admin(path: str, command: bytes, timeout: float = 2.0) -> bytes | None:
    """A ``stats`` reply from a worker's admin socket, or None when it does not answer."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock

    return ask(connect, command)


def ask(connect: Callable[[], socket.socket], command: bytes) -> bytes | None:
    try:
        with connect() as sock:
            sock.sendall(command + b"\r\n")
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    return data


def parse_stats(reply: bytes) -> dict[str, str]:
    stats: dict[str, str] = {}
    for line in reply.decode(errors="replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


class WorkersCollector(Collector):
    def __init__(self, settings: Settings) -> None:
        """``settings.admin_socket`` names the workers' admin sockets (run_workers sets one)."""
        self._settings = settings
        self._identity = PodIdentity.from_env()

    def stats(self, worker: int, sub: str = "") -> bytes | None:
        """A worker's ``stats [sub]`` reply, from its admin socket."""
        st = self._settings
        if not 0 <= worker < st.workers:
            return None
        path = worker_path(st.admin_socket, worker, st.workers)
        return fetch_admin(path, f"stats {sub}".strip().encode())

    def collect(self) -> Iterator[Metric]:
        st = self._settings
        replies = [(str(i), self.stats(i)) for i in range(st.workers)]
        per_worker = [(i, parse_stats(r) if r is not None else None) for i, r in replies]
        up = GaugeMetricFamily("memcached_up", "Whether the worker answers.", labels=["worker"])
        for worker, stats in per_worker:
            up.add_metric([worker], 1 if stats is not None else 0)
        yield up
        yield from self._identity.metrics()
        commands = CounterMetricFamily(
            "memcached_commands",
            "Commands by command and result.",
            labels=["worker", "command", "status"],
        )
        for worker, stats in per_worker:
            if stats is None:
                continue
            for command, status, field in COMMANDS:
                commands.add_metric([worker, command, status], float(stats.get(field, 0)))
        yield commands
        for name, doc, kind, field in _SERIES:
            family_type = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_type(name, doc, labels=["worker"])
            for worker, stats in per_worker:
                if stats is not None and field in stats:
                    family.add_metric([worker], float(stats[field]))
            yield family
        for name, doc, label, values in _LABELLED:
            counter = CounterMetricFamily(name, doc, labels=["worker", label])
            for worker, stats in per_worker:
                for value, field in values:
                    if stats is not None and field in stats:
                        counter.add_metric([worker, value], float(stats[field]))
            yield counter
        warm = InfoMetricFamily(
            "cacheappliance_warm_restart",
            "What the last start did with its warm-restart snapshot.",
            labels=["worker"],
        )
        for worker, stats in per_worker:
            if stats is not None and "warm_restart" in stats:
                reason = stats.get("warm_restart_reason", "-")
                result = {
                    "result": stats["warm_restart"],
                    "reason": "" if reason == "-" else reason,
                }
                warm.add_metric([worker], result)
        yield warm
        latency = HistogramMetricFamily(
            "cacheappliance_request_duration_seconds",
            "Server time to handle one read's requests, sampled 1 in 64 reads.",
            labels=["worker"],
        )
        for worker, stats in per_worker:
            histogram = histogram_from_stats(stats) if stats is not None else None
            if histogram is not None:
                buckets, total = histogram
                latency.add_metric([worker], buckets, sum_value=total)
        yield latency


async def serve_aggregated_metrics(settings: Settings) -> asyncio.Server:
    registry = CollectorRegistry(auto_describe=False)
    collector = WorkersCollector(settings)
    registry.register(collector)
    return await serve_metrics(registry, settings.host, settings.metrics_port, collector.stats)
