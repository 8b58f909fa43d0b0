"""The ``stats`` command's answers (general, settings, items, slabs, sizes, conns, reset),
memcached's field names with this server's honest values. Read only when a client asks.
(``stats detail`` and ``stats cachedump`` are the protocol layer's: commands.py.)"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterable

from cacheserver.config import Settings
from cacheserver.metrics.counters import Counters
from cacheserver.metrics.table import reading
from cacheserver.storage import Store

StatLines = Iterable[tuple[str, object]]


def format_stats(lines: StatLines, prefix: str = "STAT") -> bytes:
    body = "".join(f"{prefix} {name} {value}\r\n" for name, value in lines)
    return (body + "END\r\n").encode()


class StatsReport:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        counters: Counters,
        version: str,
        started: float | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.counters = counters
        self.version = version
        self.started = time.time() if started is None else started
        # Extra `stats settings` lines from other layers (memory sizing adds its own).
        self.extra_settings: list[Callable[[], StatLines]] = []
        self.extra_general: list[Callable[[], StatLines]] = []
        # `stats conns`: (fd, name, value) of every socket, from the network layer.
        self.conns: Callable[[], list[tuple[int, str, str]]] | None = None
        # Whether the listeners accept (the network layer pauses them without descriptors).
        self.accepting: Callable[[], bool] = lambda: True

    def __call__(self, sub: bytes) -> bytes | None:
        if sub == b"":
            return format_stats(self.general())
        if sub == b"settings":
            return format_stats(self.settings_lines())
        if sub == b"items":
            return format_stats(self.items_lines())
        if sub == b"slabs":
            return format_stats(self.slabs_lines())
        if sub == b"sizes":
            # memcached keeps an item size histogram only with -o track_sizes.
            return format_stats([("sizes_status", "disabled")])
        if sub == b"conns" and self.conns is not None:
            lines = sorted(self.conns(), key=lambda line: line[0])  # by fd, as memcached
            return format_stats((f"{fd}:{name}", value) for fd, name, value in lines)
        if sub == b"reset":
            self.reset()
            return b"RESET\r\n"
        return None

    def reset(self) -> None:
        connections = (self.counters.curr_connections,)
        for name in self.counters.as_dict():
            setattr(self.counters, name, 0)
        self.counters.curr_connections = connections[0]

    def reading(self) -> dict[str, str]:
        """``stats``, ``stats settings`` and ``stats slabs`` as the metrics table reads them
        (metrics/table.py): what a scrape exports."""
        return reading(
            {"": self.general(), "settings": self.settings_lines(), "slabs": self.slabs_lines()}
        )

    def general(self) -> StatLines:
        c = self.counters
        store = self.store
        s = store.stats
        now = time.time()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        lines: list[tuple[str, object]] = [
            ("pid", os.getpid()),
            ("uptime", int(now - self.started)),
            ("time", int(now)),
            ("version", self.version),
            ("pointer_size", 64),
            ("rusage_user", f"{usage.ru_utime:.6f}"),
            ("rusage_system", f"{usage.ru_stime:.6f}"),
            ("max_connections", self.settings.conn_limit),
            ("curr_connections", c.curr_connections),
            ("total_connections", c.total_connections),
            ("rejected_connections", c.rejected_connections),
            ("connection_structures", c.curr_connections),
            ("cmd_get", c.cmd_get),
            ("cmd_set", c.cmd_set),
            ("cmd_flush", c.cmd_flush),
            ("cmd_touch", c.cmd_touch),
            ("get_hits", c.get_hits),
            ("get_misses", c.get_misses),
            ("get_expired", s.get_expired),
            ("get_flushed", s.get_flushed),
            ("delete_misses", c.delete_misses),
            ("delete_hits", c.delete_hits),
            ("incr_misses", c.incr_misses),
            ("incr_hits", c.incr_hits),
            ("decr_misses", c.decr_misses),
            ("decr_hits", c.decr_hits),
            ("cas_misses", c.cas_misses),
            ("cas_hits", c.cas_hits),
            ("cas_badval", c.cas_badval),
            ("touch_hits", c.touch_hits),
            ("touch_misses", c.touch_misses),
            ("store_too_large", c.store_too_large),
            ("store_no_memory", c.store_no_memory),
            ("auth_cmds", c.auth_cmds),
            ("auth_errors", c.auth_errors),
            ("idle_kicks", c.idle_kicks),
            ("bytes_read", c.bytes_read),
            ("bytes_written", c.bytes_written),
            ("limit_maxbytes", store.capacity),
            ("accepting_conns", 1 if self.accepting() else 0),
            ("listen_disabled_num", c.listen_disabled_num),
            ("threads", self.settings.workers),
            # memcached's -R: a connection yields after so many requests in one event. Here a
            # read is served whole (its replies bounded by the session's reply limit), so
            # there is nothing to count.
            ("conn_yields", 0),
            ("bytes", store.bytes_used),
            ("curr_items", store.curr_items),
            ("total_items", s.total_items),
            ("expired_unfetched", s.expired_unfetched),
            ("evicted_unfetched", s.evicted_unfetched),
            ("evictions", s.evictions + s.evictions_shrinker),
            ("evictions_capacity", s.evictions),
            ("evictions_shrinker", s.evictions_shrinker),
            ("reclaimed", s.reclaimed),
            ("crawler_items_checked", s.crawler_items_checked),
            ("udp_datagrams_received", c.udp_datagrams_received),
            ("udp_datagrams_sent", c.udp_datagrams_sent),
            ("udp_dropped_malformed", c.udp_dropped_malformed),
            ("udp_dropped_multidatagram", c.udp_dropped_multidatagram),
            ("udp_refused_commands", c.udp_refused_commands),
            ("udp_send_errors", c.udp_send_errors),
        ]
        for extra in self.extra_general:
            lines.extend(extra())
        return lines

    def settings_lines(self) -> StatLines:
        st = self.settings
        lines: list[tuple[str, object]] = [
            ("maxbytes", self.store.capacity),
            ("maxconns", st.conn_limit),
            ("tcpport", st.port),
            ("udpport", st.udp_port),
            ("inter", st.listen),
            ("verbosity", st.verbose),
            ("evictions", "on"),
            ("num_threads", st.workers),
            ("cas_enabled", "yes"),
            ("binding_protocol", "ascii"),
            ("auth_enabled_sasl", "no"),
            ("auth_enabled_ascii", st.auth_file or "no"),
            ("item_size_max", st.max_item_size),
            ("idle_timeout", st.idle_timeout),
            ("flush_enabled", "no" if st.disable_flush_all else "yes"),
            ("dump_enabled", "no" if st.disable_dumping else "yes"),
            ("shutdown_command", "yes" if st.enable_shutdown else "no"),
            ("udp_allow_all", "yes" if st.udp_allow_all else "no"),
            ("metrics_port", st.metrics_port),
        ]
        for extra in self.extra_settings:
            lines.extend(extra())
        return lines

    def items_lines(self) -> StatLines:
        store = self.store
        if store.curr_items == 0:
            return []
        s = store.stats
        # One LRU, reported as slab class 1 so exporters that read per-class items find it.
        return [
            ("items:1:number", store.curr_items),
            ("items:1:mem_requested", store.bytes_used),
            ("items:1:evicted", s.evictions + s.evictions_shrinker),
            ("items:1:evicted_unfetched", s.evicted_unfetched),
            ("items:1:expired_unfetched", s.expired_unfetched),
            ("items:1:reclaimed", s.reclaimed),
            ("items:1:outofmemory", self.counters.store_no_memory),
        ]

    def slabs_lines(self) -> StatLines:
        store = self.store
        lines: list[tuple[str, object]] = []
        if store.curr_items:
            c = self.counters
            lines += [
                ("1:used_chunks", store.curr_items),
                ("1:get_hits", c.get_hits),
                ("1:cmd_set", c.cmd_set),
                ("1:delete_hits", c.delete_hits),
                ("1:incr_hits", c.incr_hits),
                ("1:decr_hits", c.decr_hits),
                ("1:cas_hits", c.cas_hits),
                ("1:cas_badval", c.cas_badval),
                ("1:touch_hits", c.touch_hits),
            ]
        lines += [
            ("active_slabs", 1 if store.curr_items else 0),
            ("total_malloced", store.bytes_used),
        ]
        return lines
