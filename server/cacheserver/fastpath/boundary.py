"""The one place where the compiled fast path meets the Python layers.

Two things cross it, and both are declared here:

- ``CONSTANTS``: every number (and the one key) the C code shares with the Python layers.
  Each is defined once, in the Python module that owns it; the extension reads this table
  when it is imported (``boundary.c``) and has no value of its own for any of them, so a
  change on the Python side is what the C code runs with, without a rebuild. The C code
  refuses to load when an entry is missing, extra or out of the range it is written for.
- The Python objects' public names it reads, writes or calls, as the Protocols below. The
  engine looks every one of them up when it is made or attached (a rename fails there, at
  start, not on a request) and keeps the objects and bound methods it calls. It reads no
  private attribute and no slot.

The store is not a Python object to the fast path: ``storage.Store`` is an instance of the
compiled store core's type, and the C code calls the core's functions (``storage/core.h``:
lookup, hit, fits, set; the item layout) with no Python in between. The core's version is
checked when the extension is imported.

``boundary.c`` is the only C file that names a Python attribute or calls Python code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cacheserver.discovery import membership
from cacheserver.metrics import latency
from cacheserver.network import tcp, udp
from cacheserver.protocol import commands, meta, numbers, session

if TYPE_CHECKING:
    from cacheserver.metrics.prefix_stats import PrefixStats

CONSTANTS: dict[str, int | bytes | str] = {
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
