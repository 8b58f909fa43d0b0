"""Every metric the cache server exports, declared once: name, type, help, and the ``stats``
line its value is read from.

``stats`` is the one source of values. A worker's collector reads its own ``stats``,
``stats settings`` and ``stats slabs`` lines at scrape time, the supervisor of ``-t N`` reads
the same lines from each worker's admin socket, and both turn them into metrics with this
table (``collector.families``), so the two cannot drift apart and a line added here is
exported by both. Nothing here runs on the request path.

Names follow prometheus/memcached_exporter where the meaning is the same (dashboards and
alerts written for memcached work unchanged); the appliance's own are ``cacheappliance_*``.
A name is written as it is exposed: counters end in ``_total``, info metrics in ``_info``.
A ``stats`` line is named as a client asks for it: ``"uptime"``, ``"settings maxconns"``,
``"slabs total_malloced"``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from cacheserver.memory.pressure import PressureLevel

Kind = Literal["gauge", "counter", "info", "histogram"]
# The stats replies the table reads: "" is plain `stats`.
GROUPS = ("", "settings", "slabs")


@dataclass(frozen=True)
class Family:
    """One metric family. Its samples are ``series``: (label values, stats line) pairs, one
    pair with no labels for a plain gauge or counter. A family whose ``label_stats`` name
    stats lines instead has one sample of value 1 whose labels carry those lines' values
    (info metrics, memcached_version). A family with neither is filled by the collector
    itself (``up``, the pod's identity)."""

    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    series: tuple[tuple[tuple[str, ...], str], ...] = ()
    label_stats: tuple[tuple[str, str], ...] = ()
    parse: Callable[[str], float] = float

    @property
    def stats(self) -> tuple[str, ...]:
        """The stats lines this family reads (a histogram's: the prefix of its lines)."""
        return (*(key for _, key in self.series), *(key for _, key in self.label_stats))


def gauge(name: str, help: str, stat: str, parse: Callable[[str], float] = float) -> Family:
    return Family(name, "gauge", help, series=(((), stat),), parse=parse)


def counter(name: str, help: str, stat: str) -> Family:
    return Family(name, "counter", help, series=(((), stat),))


def by_label(name: str, help: str, label: str, series: Mapping[str, str]) -> Family:
    """A counter with one label, each value read from its own stats line."""
    return Family(name, "counter", help, (label,), tuple(((v,), k) for v, k in series.items()))


def info(name: str, help: str, kind: Kind = "info", **label_stats: str) -> Family:
    """Value 1, labels from stats lines (a line reading ``-`` gives an empty label)."""
    return Family(name, kind, help, tuple(label_stats), label_stats=tuple(label_stats.items()))


def pressure_level(label: str) -> float:
    return float(PressureLevel[label.upper()])


# (command label, status label, stats line) as memcached_exporter reports them.
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

UP = Family("memcached_up", "gauge", "Whether the server (with -t N: the worker) answers.")
POD = Family(
    "cacheappliance_pod_info", "info", "The pod, node and partition this appliance runs as."
)

FAMILIES: tuple[Family, ...] = (
    UP,
    POD,
    # -- memcached_exporter's names ------------------------------------------------------------
    gauge("memcached_uptime_seconds", "Seconds since start.", "uptime"),
    gauge("memcached_time_seconds", "The server's clock: seconds since the epoch.", "time"),
    info("memcached_version_info", "The server's version.", version="version"),
    info("memcached_version", "The server's version (always 1).", kind="gauge", version="version"),
    counter("memcached_process_user_cpu_seconds_total", "CPU seconds in user mode.", "rusage_user"),
    counter(
        "memcached_process_system_cpu_seconds_total",
        "CPU seconds in the kernel.",
        "rusage_system",
    ),
    Family(
        "memcached_commands_total",
        "counter",
        "Commands by command and result.",
        ("command", "status"),
        tuple(((command, status), key) for command, status, key in COMMANDS),
    ),
    gauge("memcached_current_items", "Items stored.", "curr_items"),
    counter("memcached_items_total", "Items ever stored.", "total_items"),
    gauge("memcached_current_bytes", "Bytes the items take.", "bytes"),
    gauge("memcached_limit_bytes", "Bytes the cache may hold.", "limit_maxbytes"),
    gauge(
        "memcached_malloced_bytes",
        "Bytes allocated for items (no slab pages here: the items' own size).",
        "slabs total_malloced",
    ),
    counter("memcached_items_evicted_total", "Valid items evicted to make room.", "evictions"),
    counter("memcached_items_reclaimed_total", "Expired items reclaimed.", "reclaimed"),
    counter(
        "memcached_item_too_large_total",
        "Stores refused because the item is larger than -I allows.",
        "store_too_large",
    ),
    counter(
        "memcached_item_no_memory_total",
        "Stores refused because the item does not fit in the cache at all.",
        "store_no_memory",
    ),
    gauge("memcached_current_connections", "Open connections.", "curr_connections"),
    gauge("memcached_max_connections", "The connection limit (-c).", "max_connections"),
    counter("memcached_connections_total", "Connections accepted.", "total_connections"),
    counter(
        "memcached_connections_rejected_total",
        "Connections refused at the limit.",
        "rejected_connections",
    ),
    gauge(
        "memcached_accepting_connections",
        "1 while the listeners accept, 0 while they are paused (out of file descriptors).",
        "accepting_conns",
    ),
    counter(
        "memcached_connections_listener_disabled_total",
        "Times the listeners were paused because the process ran out of file descriptors.",
        "listen_disabled_num",
    ),
    counter(
        "memcached_connections_yielded_total",
        "Connections that yielded at a per-read request limit (-R): none here, always 0.",
        "conn_yields",
    ),
    counter("memcached_read_bytes_total", "Bytes read from clients.", "bytes_read"),
    counter("memcached_written_bytes_total", "Bytes written to clients.", "bytes_written"),
    # -- the appliance's own -------------------------------------------------------------------
    by_label(
        "cacheappliance_evictions_total",
        "Valid items evicted, by cause.",
        "cause",
        {"capacity": "evictions_capacity", "shrinker": "evictions_shrinker"},
    ),
    by_label(
        "cacheappliance_udp_dropped_datagrams_total",
        "UDP datagrams dropped.",
        "reason",
        {
            "malformed": "udp_dropped_malformed",
            "multi_datagram_request": "udp_dropped_multidatagram",
            "send_error": "udp_send_errors",
        },
    ),
    counter(
        "cacheappliance_udp_refused_commands_total",
        "Commands refused over UDP by the amplification guard.",
        "udp_refused_commands",
    ),
    Family(
        "cacheappliance_request_duration_seconds",
        "histogram",
        "Server time to handle one read's requests, sampled 1 in 64 reads.",
        series=(((), "request_duration"),),
    ),
    # The memory layer (cacheserver.memory): its limit, sizing and shrinker.
    gauge("cacheappliance_memory_limit_bytes", "The memory limit sized to.", "memory_limit"),
    info(
        "cacheappliance_memory_limit_source_info",
        "Where the memory limit came from; auto or fixed sizing.",
        source="memory_limit_source",
        sizing="settings memory_sizing",
    ),
    gauge(
        "cacheappliance_memory_headroom_bytes",
        "Memory kept free under the limit.",
        "settings memory_headroom",
    ),
    gauge(
        "cacheappliance_memory_baseline_bytes",
        "Memory the server needs whatever it stores.",
        "settings memory_baseline",
    ),
    gauge(
        "cacheappliance_memory_working_set_bytes",
        "Working set of what the limit applies to.",
        "memory_working_set",
    ),
    gauge(
        "cacheappliance_memory_resident_bytes", "Resident memory of the process.", "memory_resident"
    ),
    gauge(
        "cacheappliance_memory_high_watermark_bytes",
        "Working set above which the shrinker evicts.",
        "memory_high_watermark",
    ),
    gauge(
        "cacheappliance_memory_low_watermark_bytes",
        "The shrinker evicts down to this.",
        "memory_low_watermark",
    ),
    gauge(
        "cacheappliance_memory_pressure_level",
        "Current memory pressure: 0 none, 1 low, 2 medium, 3 critical.",
        "memory_pressure",
        parse=pressure_level,
    ),
    counter(
        "cacheappliance_memory_shrink_events_total",
        "Times the shrinker evicted.",
        "memory_shrink_events",
    ),
    counter(
        "cacheappliance_memory_shrinker_released_bytes_total",
        "Bytes of items the shrinker evicted.",
        "memory_bytes_released",
    ),
    # Auto discovery (cacheserver.discovery), with --cluster-config.
    gauge(
        "cacheappliance_cluster_config_version",
        "Version of the cluster membership served (0: none yet).",
        "cluster_config_version",
    ),
    gauge(
        "cacheappliance_cluster_config_nodes",
        "Endpoints in the cluster membership served.",
        "cluster_config_nodes",
    ),
    gauge(
        "cacheappliance_cluster_config_age_seconds",
        "Seconds since the cluster membership last changed.",
        "cluster_config_age",
    ),
    gauge(
        "cacheappliance_cluster_config_lag_seconds",
        "Seconds from a membership change to serving it here.",
        "cluster_config_lag",
    ),
    counter(
        "cacheappliance_cluster_config_load_errors_total",
        "Membership files that could not be read or parsed.",
        "cluster_config_load_errors",
    ),
    counter(
        "cacheappliance_cluster_config_requests_total",
        "config get cluster and get AmazonElastiCache:cluster requests answered.",
        "cluster_config_requests",
    ),
    # Who may talk to the server (cacheserver.security): -Y and -Z.
    counter(
        "cacheappliance_auth_commands_total", "Logins tried (-Y), right or wrong.", "auth_cmds"
    ),
    counter(
        "cacheappliance_auth_errors_total",
        "Logins refused (-Y): wrong user or password.",
        "auth_errors",
    ),
    gauge(
        "cacheappliance_auth_file_entries",
        "Users in the credentials file being served.",
        "auth_file_entries",
    ),
    counter(
        "cacheappliance_auth_file_reloads_total",
        "Times a changed credentials file was taken into service.",
        "auth_file_reloads",
    ),
    counter(
        "cacheappliance_auth_file_load_errors_total",
        "Credentials files that could not be read or parsed (the last good one served).",
        "auth_file_load_errors",
    ),
    counter(
        "cacheappliance_tls_handshake_errors_total",
        "TLS handshakes that failed: plaintext clients, refused client certificates.",
        "ssl_handshake_errors",
    ),
    gauge(
        "cacheappliance_tls_cert_age_seconds",
        "Seconds since the TLS certificates in service were loaded.",
        "time_since_server_cert_refresh",
    ),
    counter(
        "cacheappliance_tls_cert_reloads_total",
        "Times changed TLS certificates were taken into service.",
        "ssl_cert_reloads",
    ),
    counter(
        "cacheappliance_tls_cert_load_errors_total",
        "TLS certificate reloads that failed (the last good ones kept serving).",
        "ssl_cert_load_errors",
    ),
    # Warm restart (-e, cacheserver.warm).
    info(
        "cacheappliance_warm_restart_info",
        "What the last start did with its warm-restart snapshot.",
        result="warm_restart",
        reason="warm_restart_reason",
    ),
    gauge(
        "cacheappliance_warm_restart_restored_items",
        "Items restored from the snapshot at start.",
        "warm_restart_restored_items",
    ),
    gauge(
        "cacheappliance_warm_restart_restored_bytes",
        "Bytes of keys and items restored at start.",
        "warm_restart_restored_bytes",
    ),
    gauge(
        "cacheappliance_warm_restart_restore_seconds",
        "Seconds the restore took.",
        "warm_restart_restore_seconds",
    ),
)


def reading(replies: Mapping[str, Iterable[tuple[str, object]]]) -> dict[str, str]:
    """The lines of a worker's stats replies (``GROUPS``: "" for ``stats``, "settings", ...)
    as one mapping from the names the table uses to the values as a client reads them."""
    return {
        f"{group} {name}".lstrip(): str(value)
        for group, lines in replies.items()
        for name, value in lines
    }
