"""TCP connections: one asyncio protocol object per client, fed by the event loop's shared
read buffer (no per-connection buffer beyond a partial request)."""

from __future__ import annotations

import asyncio
from time import perf_counter

from cacheserver.metrics.counters import Counters
from cacheserver.metrics.latency import SAMPLE_MASK, LatencyHistogram
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.session import TextSession

TOO_MANY_CONNECTIONS = b"ERROR Too many open connections\r\n"


class ConnectionTracker:
    """Counts open connections against the limit and closes idle ones.

    Idle detection is tick-based: a connection remembers the sweeper's tick when it last
    received bytes, so the request path stores one int instead of reading a clock.
    """

    def __init__(self, counters: Counters, limit: int, idle_timeout: float) -> None:
        self.counters = counters
        self.limit = limit
        self.idle_timeout = idle_timeout
        self.tick = 0
        self.open: set[TCPConnection] = set()
        self.latency = LatencyHistogram()

    def sweep(self, period: float) -> None:
        """Called every ``period`` seconds: close connections idle for the timeout or longer."""
        self.tick += 1
        if self.idle_timeout <= 0:
            return
        max_idle_ticks = max(1, round(self.idle_timeout / period))
        for conn in list(self.open):
            if self.tick - conn.seen_tick > max_idle_ticks and conn.session.idle:
                self.counters.idle_kicks += 1
                conn.close()

    def close_all(self) -> None:
        for conn in list(self.open):
            conn.close()


class TCPConnection(asyncio.Protocol):
    __slots__ = ("_paused", "_tracker", "seen_tick", "session", "transport")

    def __init__(self, commands: Commands, tracker: ConnectionTracker) -> None:
        self.session = TextSession(commands)
        self._tracker = tracker
        self.transport: asyncio.Transport | None = None
        self.seen_tick = tracker.tick
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        tracker = self._tracker
        counters = tracker.counters
        counters.total_connections += 1
        if len(tracker.open) >= tracker.limit:
            counters.rejected_connections += 1
            transport.write(TOO_MANY_CONNECTIONS)
            transport.close()
            return
        tracker.open.add(self)
        counters.curr_connections += 1

    def data_received(self, data: bytes) -> None:
        tracker = self._tracker
        self.seen_tick = tracker.tick
        counters = tracker.counters
        counters.bytes_read += len(data)
        session = self.session
        latency = tracker.latency
        latency.reads += 1
        if latency.reads & SAMPLE_MASK:
            out = session.feed(data)
        else:
            started = perf_counter()
            out = session.feed(data)
            latency.observe(perf_counter() - started)
        transport = self.transport
        if out:
            counters.bytes_written += len(out)
            transport.write(out)  # type: ignore[union-attr]
        if session.closing:
            transport.close()  # type: ignore[union-attr]

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does.
        self._paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        tracker = self._tracker
        if self in tracker.open:
            tracker.open.discard(self)
            tracker.counters.curr_connections -= 1

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
