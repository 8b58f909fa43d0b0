"""UDP: memcached's 8-byte frame header around text-protocol requests and replies.

Header (network byte order): request id, sequence number, datagram count, reserved. A
request must fit in one datagram; a reply of any size is split into numbered datagrams of
at most ``MAX_PAYLOAD`` bytes each, which the client reassembles by sequence number.
"""

from __future__ import annotations

import asyncio
import struct

from cacheserver.metrics.counters import Counters
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


class UDPEndpoint(asyncio.DatagramProtocol):
    def __init__(self, commands: Commands, counters: Counters, allow_all: bool = False) -> None:
        self._counters = counters
        # One session serves every datagram: each request is complete in its datagram, so
        # the session is only reset when a datagram left a partial request behind.
        self._session = TextSession(commands, None if allow_all else UDP_SAFE_COMMANDS)
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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
        session = self._session
        reply = session.feed(data[HEADER_SIZE:])
        if not session.idle or session.closing or session.refused:
            counters.udp_refused_commands += session.refused
            session.reset()  # a request cut off at the datagram's end is dropped with it
        if not reply:
            return
        transport = self.transport
        if len(reply) <= MAX_PAYLOAD:
            datagram = HEADER.pack(request_id, 0, 1, 0) + reply
            transport.sendto(datagram, addr)  # type: ignore[union-attr]
            counters.udp_datagrams_sent += 1
            counters.bytes_written += len(datagram)
            return
        if len(reply) > MAX_PAYLOAD * MAX_DATAGRAMS:
            reply = b"SERVER_ERROR reply too large for UDP\r\n"
        assert transport is not None
        for datagram in frame_reply(request_id, reply):
            transport.sendto(datagram, addr)
            counters.udp_datagrams_sent += 1
            counters.bytes_written += len(datagram)

    def error_received(self, exc: Exception) -> None:
        # An ICMP error for an earlier reply (client gone): nothing to do for a cache.
        pass
