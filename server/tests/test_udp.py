"""UDP with raw datagrams: memcached's 8-byte frame header, replies split over numbered
datagrams, and what is dropped (malformed frames, multi-datagram requests) or refused."""

from __future__ import annotations

import socket
import struct

import pytest

from servers import RunningServer, request, start_cacheserver

HEADER = struct.Struct("!HHHH")


def udp_exchange(
    server: RunningServer, payload: bytes, request_id: int = 7, timeout: float = 3.0
) -> list[bytes]:
    """Send one framed request; return the datagrams of the reply, in arrival order."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.settimeout(timeout)
        sock.sendto(HEADER.pack(request_id, 0, 1, 0) + payload, ("127.0.0.1", server.udp_port))
        datagrams = [sock.recv(65536)]
        total = HEADER.unpack_from(datagrams[0])[2]
        while len(datagrams) < total:
            datagrams.append(sock.recv(65536))
        return datagrams


def reassemble(datagrams: list[bytes], request_id: int = 7) -> bytes:
    parts = {}
    for dgram in datagrams:
        rid, seq, total, reserved = HEADER.unpack_from(dgram)
        assert rid == request_id and reserved == 0
        assert total == len(datagrams)
        parts[seq] = dgram[HEADER.size :]
    assert sorted(parts) == list(range(len(datagrams)))
    return b"".join(parts[i] for i in range(len(datagrams)))


def stat(server: RunningServer, name: str) -> int:
    reply = request(server, b"stats\r\n", b"END\r\n")
    for line in reply.decode().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1] == name:
            return int(parts[2])
    raise KeyError(name)


@pytest.fixture(scope="module")
def udp_server():
    server = start_cacheserver()
    yield server
    server.stop()


def test_small_get_set_over_udp(udp_server: RunningServer) -> None:
    assert reassemble(udp_exchange(udp_server, b"set u 1 0 3\r\nabc\r\n")) == b"STORED\r\n"
    reply = reassemble(udp_exchange(udp_server, b"get u\r\n"))
    assert reply == b"VALUE u 1 3\r\nabc\r\nEND\r\n"


def test_large_value_comes_back_split_and_reassembles_exactly(udp_server: RunningServer) -> None:
    value = bytes(range(256)) * 1000  # 256,000 bytes, every byte value
    assert request(udp_server, b"set large 0 0 %d\r\n%s\r\n" % (len(value), value)) == b"STORED\r\n"
    datagrams = udp_exchange(udp_server, b"get large\r\n", request_id=4242)
    assert len(datagrams) > 100
    assert all(len(d) <= 1408 for d in datagrams)  # each fits one Ethernet MTU
    body = reassemble(datagrams, request_id=4242)
    assert body == b"VALUE large 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)


def test_multi_get_comes_back_split_and_reassembles_exactly(udp_server: RunningServer) -> None:
    keys = [b"mg%02d" % i for i in range(40)]
    expected = b""
    for i, key in enumerate(keys):
        value = (b"%02d" % i) * 50
        request(udp_server, b"set %s %d 0 %d\r\n%s\r\n" % (key, i, len(value), value))
        expected += b"VALUE %s %d %d\r\n%s\r\n" % (key, i, len(value), value)
    datagrams = udp_exchange(udp_server, b"get " + b" ".join(keys) + b"\r\n", request_id=9)
    assert len(datagrams) >= 3
    assert reassemble(datagrams, request_id=9) == expected + b"END\r\n"


def test_malformed_and_multi_datagram_requests_are_dropped_and_counted(
    udp_server: RunningServer,
) -> None:
    malformed_before = stat(udp_server, "udp_dropped_malformed")
    multi_before = stat(udp_server, "udp_dropped_multidatagram")
    target = ("127.0.0.1", udp_server.udp_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(b"", target)  # empty
        sock.sendto(b"\x00\x01get", target)  # shorter than a header
        sock.sendto(HEADER.pack(1, 0, 0, 0) + b"get u\r\n", target)  # zero datagrams
        sock.sendto(HEADER.pack(1, 5, 2, 0) + b"get u\r\n", target)  # sequence past count
        sock.sendto(HEADER.pack(2, 0, 2, 0) + b"set u 0 0 1\r\n", target)  # first of two
        sock.sendto(HEADER.pack(2, 1, 2, 0) + b"x\r\n", target)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # none of them is answered
    assert stat(udp_server, "udp_dropped_malformed") - malformed_before == 4
    assert stat(udp_server, "udp_dropped_multidatagram") - multi_before == 2
    # Still serving, over both transports.
    assert reassemble(udp_exchange(udp_server, b"get u\r\n")).startswith(b"VALUE u ")
    assert request(udp_server, b"version\r\n").startswith(b"VERSION ")


def test_amplifying_commands_are_refused_over_udp(udp_server: RunningServer) -> None:
    reply = reassemble(udp_exchange(udp_server, b"stats\r\n"))
    assert reply == b"SERVER_ERROR command not allowed over UDP\r\n"
    reply = reassemble(udp_exchange(udp_server, b"flush_all\r\n"))
    assert reply == b"SERVER_ERROR command not allowed over UDP\r\n"
    assert stat(udp_server, "udp_refused_commands") >= 2
    assert reassemble(udp_exchange(udp_server, b"get u\r\n")).startswith(b"VALUE u ")


def test_udp_allow_all_answers_every_command() -> None:
    server = start_cacheserver("--udp-allow-all")
    try:
        reply = reassemble(udp_exchange(server, b"stats\r\n"))
        assert reply.startswith(b"STAT pid ") and reply.endswith(b"END\r\n")
    finally:
        server.stop()


def test_several_commands_in_one_datagram(udp_server: RunningServer) -> None:
    reply = reassemble(udp_exchange(udp_server, b"set a1 0 0 1\r\n1\r\nget a1\r\ndelete a1\r\n"))
    assert reply == b"STORED\r\nVALUE a1 0 1\r\n1\r\nEND\r\nDELETED\r\n"


def test_udp_is_off_unless_asked() -> None:
    server = start_cacheserver(udp=False)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(0.5)
            sock.sendto(HEADER.pack(1, 0, 1, 0) + b"version\r\n", ("127.0.0.1", server.port))
            with pytest.raises(OSError):  # refused (ICMP) or timed out: nobody answers
                sock.recv(65536)
    finally:
        server.stop()


def test_a_request_cut_off_at_the_datagram_end_does_not_leak_into_the_next(
    udp_server: RunningServer,
) -> None:
    target = ("127.0.0.1", udp_server.udp_port)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.5)
        sock.sendto(HEADER.pack(3, 0, 1, 0) + b"set cut 0 0 10\r\nabc", target)
        with pytest.raises(TimeoutError):
            sock.recv(65536)  # incomplete: nothing stored, nothing answered
    reply = reassemble(udp_exchange(udp_server, b"get cut\r\n"))
    assert reply == b"END\r\n"
