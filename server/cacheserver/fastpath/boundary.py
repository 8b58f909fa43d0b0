"""The one place where the compiled fast path meets the Python layers.

Two things cross it, and both are declared here:

- ``CONSTANTS``: every number (and the one key) the C code shares with the Python layers.
  Each is defined once, in the Python module that owns it; the extension reads this table
  when it is imported (``boundary.c``) and has no value of its own for any of them, so a
  change on the Python side is what the C code runs with, without a rebuild. The C code
  refuses to load when an entry is missing, extra or out of the range it is written for.
- The Python objects' public names it reads, writes or calls, as the Protocols below. The
  engine looks every one of them up when it is made or attached (a rename fails there, at
  start, not on a request) and keeps the objects and bound methods it calls; per request it
  touches only the store's dict and item bytes, in the layout and by the rules of
  ``storage/item.py`` and ``storage/store.py``. It reads no private attribute and no slot.

``boundary.c`` is the only C file that names a Python attribute or calls Python code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cacheserver.discovery import membership
from cacheserver.metrics import latency
from cacheserver.network import tcp, udp
from cacheserver.protocol import commands, meta, numbers, session
from cacheserver.storage import item, store

if TYPE_CHECKING:
    from cacheserver.metrics.prefix_stats import PrefixStats
    from cacheserver.storage.store import StoreStats

CONSTANTS: dict[str, int | bytes | str] = {
    # storage/item.py: the item layout. The C code is written for this header format.
    "HEADER_FORMAT": item.HEADER_FORMAT,
    "HEADER_SIZE": item.HEADER_SIZE,
    "EXPTIME_AT": item.EXPTIME_AT,
    "FLAGS_AT": item.FLAGS_AT,
    "BUMPED_AT": item.BUMPED_AT,
    "META_AT": item.META_AT,
    "MARKS_AT": item.MARKS_AT,
    "FETCHED": item.FETCHED,
    "OFFSET_MASK": item.OFFSET_MASK,
    "ITEM_OVERHEAD": item.ITEM_OVERHEAD,
    # storage/store.py: the LRU rule and -I as memcached applies it.
    "BUMP_INTERVAL": store.BUMP_INTERVAL,
    "MEMCACHED_ITEM_OVERHEAD": store.MEMCACHED_ITEM_OVERHEAD,
    # protocol/: the limits a request must keep to be answered without the Python path.
    "KEY_MAX_LENGTH": commands.KEY_MAX_LENGTH,
    "MAX_RELATIVE_EXPTIME": commands.MAX_RELATIVE_EXPTIME,
    "U32_MAX": numbers.U32_MAX,
    "I32_MAX": numbers.I32_MAX,
    "REPLY_LIMIT": session.TCP_REPLY_LIMIT,
    "META_MAX_WORDS": meta.MAX_WORDS,
    "META_MAX_OPAQUE": meta.MAX_OPAQUE_LENGTH,
    # discovery/membership.py: a get of this key alone is auto discovery (the session's).
    "CLUSTER_KEY": membership.CLUSTER_KEY,
    # metrics/latency.py: one read in SAMPLE_MASK + 1 is timed.
    "SAMPLE_MASK": latency.SAMPLE_MASK,
    # network/: the reads and batches of one wake-up, as the Python servers make them, and
    # memcached's UDP frame header (the C code writes it in this format).
    "READ_SIZE": tcp.READ_SIZE,
    "TCP_BATCH": tcp.BATCH,
    "UDP_HEADER_FORMAT": udp.HEADER.format,
    "UDP_HEADER": udp.HEADER_SIZE,
    "UDP_MAX_PAYLOAD": udp.MAX_PAYLOAD,
    "UDP_BATCH": udp.BATCH,
}


@runtime_checkable
class EngineStore(Protocol):
    """``storage.Store``. Kept once: ``table`` (the dict the fast path reads and changes in
    place), ``clock``, ``stats`` and ``make_room``. Read when a wake-up begins and written
    back before any Python code runs: ``last_cas``, ``bytes_used``; read: ``capacity``,
    ``max_item_size``, ``flush_at`` (the fast path steps aside while a flush is pending)."""

    table: dict[bytes, bytes]
    clock: Callable[[], float]
    stats: StoreStats  # total_items, reclaimed, expired_unfetched, get_expired: added to
    last_cas: int
    bytes_used: int
    capacity: int
    max_item_size: int
    flush_at: int

    def make_room(self, keep: bytes) -> None: ...


@runtime_checkable
class EngineCommands(Protocol):
    """``protocol.commands.Commands``: ``detail``, read when a wake-up begins (the fast path
    steps aside while ``stats detail`` counts keys)."""

    detail: PrefixStats | None


@runtime_checkable
class EngineLatency(Protocol):
    """``metrics.latency.LatencyHistogram``: the timed reads of a wake-up, once it ends."""

    def observe(self, seconds: float) -> None: ...


@runtime_checkable
class EngineTCPServer(Protocol):
    """``network.tcp.TCPServer``: ``connections`` (fd -> Connection) and the four methods are
    kept at ``attach_tcp``; ``tick`` is read when a wake-up begins. The methods are the slow
    path: every event of a connection that is not ``plain``, the rest of a read from the first
    request the fast path leaves, replies the kernel did not take, a client that closed."""

    connections: dict[int, EngineConnection]
    tick: int

    def serve_event(self, fd: int, conn: EngineConnection, events: int) -> None: ...

    def finish_read(self, fd: int, conn: EngineConnection, head: bytes, rest: bytes) -> None: ...

    def send(self, fd: int, conn: EngineConnection, out: bytes) -> None: ...

    def close_connection(self, fd: int, conn: EngineConnection) -> None: ...


@runtime_checkable
class EngineConnection(Protocol):
    """``network.tcp.Connection``. ``plain`` is asked before the engine first serves a
    connection (the TCP server calls ``engine.watch(fd)`` when one enters the compiled path's
    epoll set) and after each slow-path call for it; the answer stands until then.
    ``seen_tick`` is written when a read arrives in a tick it was not yet written in."""

    seen_tick: int

    @property
    def plain(self) -> bool: ...


@runtime_checkable
class EngineUDPServer(Protocol):
    """``network.udp.UDPServer``: ``answer`` (kept at ``attach_udp``) gets the rest of a
    datagram, or a reply too large for one datagram, with what the fast path answered."""

    def answer(self, request_id: int, head: bytes, rest: bytes, addr: tuple) -> None: ...


# The counters the fast path adds to (metrics.counters.Counters' fields, named in
# boundary.c) are plain ints it reads and writes when a wake-up ends.
