"""Per-worker request counters.

Facebook's lesson: a global stats lock cost 20-30% CPU. Each worker owns one ``Counters``
object and bumps plain ints on it; nothing here locks, and nothing calls prometheus_client on
the request path. ``stats`` and the Prometheus collector read the fields when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(slots=True)
class Counters:
    cmd_get: int = 0
    cmd_set: int = 0
    cmd_flush: int = 0
    cmd_touch: int = 0
    get_hits: int = 0
    get_misses: int = 0
    delete_hits: int = 0
    delete_misses: int = 0
    incr_hits: int = 0
    incr_misses: int = 0
    decr_hits: int = 0
    decr_misses: int = 0
    cas_hits: int = 0
    cas_misses: int = 0
    cas_badval: int = 0
    touch_hits: int = 0
    touch_misses: int = 0
    store_too_large: int = 0
    store_no_memory: int = 0
    auth_cmds: int = 0  # authentication attempts (-Y), successful or not
    auth_errors: int = 0  # authentication attempts that failed
    bytes_read: int = 0
    bytes_written: int = 0
    curr_connections: int = 0
    total_connections: int = 0
    rejected_connections: int = 0
    listen_disabled_num: int = 0  # times the listeners were paused (out of file descriptors)
    idle_kicks: int = 0
    ssl_handshake_errors: int = 0  # TLS handshakes that failed (a plaintext client, a bad cert)
    protocol_errors: int = 0
    udp_datagrams_received: int = 0
    udp_datagrams_sent: int = 0
    udp_dropped_malformed: int = 0
    udp_dropped_multidatagram: int = 0
    udp_refused_commands: int = 0
    udp_send_errors: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def add(self, other: Counters) -> None:
        """Sum another worker's counters into this one (for aggregated stats)."""
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
