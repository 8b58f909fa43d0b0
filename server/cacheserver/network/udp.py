"""UDP: memcached's 8-byte frame header around text-protocol requests and replies.

Header (network byte order): request id, sequence number, datagram count, reserved. A
request must fit in one datagram; a reply of any size is split into numbered datagrams of
at most ``MAX_PAYLOAD`` bytes each, which the client reassembles by sequence number.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from cacheserver.metrics.counters import Counters
from cacheserver.network import format_address
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.session import UDP_SAFE_COMMANDS, TextSession

HEADER = struct.Struct("!HHHH")
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 1400  # memcached's UDP_MAX_PAYLOAD_SIZE: keeps each datagram inside one MTU
MAX_DATAGRAMS = 0xFFFF


def frame_reply(request_id: int, reply: bytes) -> list[bytes]:
    """Split a reply into framed datagrams."""
    count = max(1, -(-len(reply) // MAX_PAYLOAD))
    return [
        HEADER.pack(request_id, seq, count, 0) + reply[seq * MAX_PAYLOAD : (seq + 1) * MAX_PAYLOAD]
        for seq in range(count)
    ]


BATCH = 256  # datagrams drained per loop wake-up
RECEIVE_BUFFER = 4 * 1024 * 1024  # room for bursts while the worker is busy (best effort)


class UDPServer:
    """One UDP socket read directly from the event loop: each wake-up drains every datagram
    waiting (up to ``BATCH``), so a burst costs one loop iteration, not one per datagram."""

    def __init__(
        self,
        commands: Commands,
        counters: Counters,
        allow_all: bool = False,
        engine: Any | None = None,
    ) -> None:
        self._counters = counters
        # The compiled fast path (cacheserver/fastpath), shared with the worker's TCP server:
        # it runs plain gets and sets and hands the rest of a datagram to answer.
        self._engine = engine
        # One session serves every datagram: each request is complete in its datagram, so
        # the session is only reset when a datagram left a partial request behind.
        self._session = TextSession(commands, None if allow_all else UDP_SAFE_COMMANDS)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def listen(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RECEIVE_BUFFER)
        sock.bind((host, port))
        sock.setblocking(False)
        self._sock = sock
        self._loop = asyncio.get_running_loop()
        if self._engine is None:
            self._loop.add_reader(sock.fileno(), self._drain)
        else:
            self._engine.attach_udp(sock.fileno(), self)
            self._loop.add_reader(sock.fileno(), self._engine.serve_udp)
        return sock

    def conns_lines(self, uptime: int) -> list[tuple[int, str, str]]:
        """``stats conns``: the UDP socket, as memcached lists an idle UDP connection."""
        if self._sock is None:
            return []
        fd = self._sock.fileno()
        return [
            (fd, "UDP", "UDP"),
            (fd, "addr", format_address("udp", self._sock.getsockname())),
            (fd, "state", "conn_read"),
            (fd, "secs_since_last_cmd", str(uptime)),
        ]

    def close(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _drain(self) -> None:
        sock = self._sock
        assert sock is not None
        recvfrom = sock.recvfrom
        for _ in range(BATCH):
            try:
                data, addr = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # an ICMP error for an earlier reply (client gone): nothing to do
                continue
            self.datagram_received(data, addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        counters = self._counters
        counters.udp_datagrams_received += 1
        counters.bytes_read += len(data)
        if len(data) < HEADER_SIZE:
            counters.udp_dropped_malformed += 1
            return
        request_id, seq, count, _ = HEADER.unpack_from(data)
        if count == 0 or seq >= count:
            counters.udp_dropped_malformed += 1
            return
        if count != 1:
            counters.udp_dropped_multidatagram += 1
            return
        self.answer(request_id, b"", data[HEADER_SIZE:], addr)

    def answer(self, request_id: int, head: bytes, rest: bytes, addr: tuple[str, int]) -> None:
        """Reply to one datagram: ``head`` is what the compiled path already answered (empty
        without it), ``rest`` the requests left for the session."""
        session = self._session
        reply = head + session.feed(rest) if rest else head
        if not session.idle or session.closing or session.refused:
            self._counters.udp_refused_commands += session.refused
            session.reset()  # a request cut off at the datagram's end is dropped with it
        if reply:
            self._send_reply(request_id, reply, addr)

    def _send_reply(self, request_id: int, reply: bytes, addr: tuple[str, int]) -> None:
        if len(reply) <= MAX_PAYLOAD:
            self._send(HEADER.pack(request_id, 0, 1, 0) + reply, addr)
            return
        if len(reply) > MAX_PAYLOAD * MAX_DATAGRAMS:
            reply = b"SERVER_ERROR reply too large for UDP\r\n"
        for datagram in frame_reply(request_id, reply):
            self._send(datagram, addr)

    def _send(self, datagram: bytes, addr: tuple[str, int]) -> None:
        try:
            self._sock.sendto(datagram, addr)  # type: ignore[union-attr]
        except OSError:
            # A full send buffer or an unreachable client: UDP may drop, and so do we.
            self._counters.udp_send_errors += 1
            return
        self._counters.udp_datagrams_sent += 1
        self._counters.bytes_written += len(datagram)
