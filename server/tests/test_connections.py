"""Connections: the limit, the idle timeout, and many clients at once."""

from __future__ import annotations

import socket
import time

import pytest

from servers import recv_until, request, start_cacheserver
from testkit.procs import status_kib


def test_connection_limit_answers_like_memcached_and_closes() -> None:
    server = start_cacheserver("-c", "5")
    held = []
    try:
        for _ in range(5):
            sock = socket.create_connection(server.address, timeout=5)
            sock.sendall(b"version\r\n")
            assert recv_until(sock, b"\r\n").startswith(b"VERSION")
            held.append(sock)
        with socket.create_connection(server.address, timeout=5) as extra:
            # memcached 1.6 writes exactly this line, then closes.
            assert recv_until(extra, b"\x00never") == b"ERROR Too many open connections\r\n"
        held.pop().close()
        time.sleep(0.2)
        assert request(server, b"version\r\n").startswith(b"VERSION")
        stats = request(server, b"stats\r\n", b"END\r\n")
        assert b"STAT rejected_connections 1\r\n" in stats
    finally:
        for sock in held:
            sock.close()
        server.stop()


def test_idle_connections_are_closed_after_the_timeout() -> None:
    server = start_cacheserver("--idle-timeout", "1")
    try:
        with socket.create_connection(server.address, timeout=10) as idle:
            start = time.monotonic()
            assert recv_until(idle, b"\x00never", timeout=10) == b""  # closed by the server
            assert 0.9 < time.monotonic() - start < 5
        assert b"STAT idle_kicks 1\r\n" in request(server, b"stats\r\n", b"END\r\n")
    finally:
        server.stop()


def test_many_concurrent_connections() -> None:
    server = start_cacheserver("-c", "2000")
    socks = []
    try:
        for i in range(500):
            sock = socket.create_connection(server.address, timeout=10)
            sock.sendall(b"set c%d 0 0 1\r\n%d\r\n" % (i, i % 10))
            socks.append(sock)
        for i, sock in enumerate(socks):
            assert recv_until(sock, b"\r\n") == b"STORED\r\n"
            sock.sendall(b"get c%d\r\n" % i)
        for i, sock in enumerate(socks):
            assert recv_until(sock, b"END\r\n") == b"VALUE c%d 0 1\r\n%d\r\nEND\r\n" % (i, i % 10)
        stats = request(server, b"stats\r\n", b"END\r\n")
        assert b"STAT curr_connections 501\r\n" in stats
    finally:
        for sock in socks:
            sock.close()
        server.stop()


def test_a_client_that_does_not_read_its_replies_gets_them_all_later() -> None:
    """Back-pressure: the server keeps at most what the kernel refused, stops reading that
    client meanwhile, keeps serving others, and loses nothing."""
    server = start_cacheserver()
    value = b"v" * 100_000
    try:
        assert request(server, b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)) == b"STORED\r\n"
        with socket.create_connection(server.address, timeout=10) as slow:
            slow.sendall(b"get big\r\n" * 300)  # 30 MB of replies nobody reads yet
            time.sleep(0.5)
            assert request(server, b"version\r\n").startswith(b"VERSION")  # others served
            expected = b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
            chunks, total = [], 0
            while total < len(expected) * 300:
                chunk = slow.recv(1 << 20)
                assert chunk, "server closed the slow client"
                chunks.append(chunk)
                total += len(chunk)
            assert b"".join(chunks) == expected * 300
    finally:
        server.stop()


@pytest.mark.parametrize("path", ["compiled", "python"])
def test_a_burst_of_large_gets_is_answered_in_full_without_building_it_all(path: str) -> None:
    """400 pipelined gets of a 1 MB value ask for 400 MB of replies in one 4 kB write. The
    server builds them a few MB at a time, as the client takes them, not all at once (which
    would make it a candidate for its cgroup's OOM killer)."""
    server = start_cacheserver(*(["--python-only"] if path == "python" else []))
    value = bytes(range(256)) * 3900  # 998,400 bytes
    count = 400
    try:
        assert request(server, b"set big 0 0 %d\r\n%s\r\n" % (len(value), value)) == b"STORED\r\n"
        start_rss = status_kib(server.proc.pid, "VmRSS") * 1024
        peak_rss = start_rss
        expected = b"VALUE big 0 %d\r\n%s\r\nEND\r\n" % (len(value), value)
        with socket.create_connection(server.address, timeout=10) as sock:
            sock.sendall(b"get big\r\n" * count)
            received = bytearray()
            reads = 0
            while count:
                chunk = sock.recv(1 << 20)
                assert chunk, "server closed the connection"
                received += chunk
                reads += 1
                if reads % 16 == 0:
                    peak_rss = max(peak_rss, status_kib(server.proc.pid, "VmRSS") * 1024)
                # Check and drop the replies complete so far: the client keeps little too.
                whole = min(len(received) // len(expected), count)
                if whole:
                    assert received[: whole * len(expected)] == expected * whole
                    del received[: whole * len(expected)]
                    count -= whole
        assert received == b""
        assert peak_rss - start_rss < 64 * 1024 * 1024, (start_rss, peak_rss)
    finally:
        server.stop()
