"""Shard-per-core workers (-t N): one process and one port per shard, metrics gathered by the
parent, and a dead shard ends the server rather than leaving a hole in the keyspace."""

from __future__ import annotations

import os
import re
import signal
import socket
import time

from servers import (
    RunningServer,
    free_port,
    metrics_text,
    request,
    start_cacheserver,
    wait_for_port,
)


def children_of(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def wait_for_exit(server: RunningServer, timeout: float = 10) -> int | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return server.proc.returncode
        time.sleep(0.05)
    return None


def test_each_worker_is_its_own_shard_and_port() -> None:
    metrics_port = free_port()
    server = start_cacheserver(
        "-t", "2", "-m", "64", "--metrics-port", str(metrics_port), udp=False
    )
    second = RunningServer("worker1", server.port + 1, 0, server.proc)
    try:
        wait_for_port(second.port, server.proc)  # workers start independently
        assert len(children_of(server.proc.pid)) == 2
        assert request(server, b"set k 0 0 1\r\na\r\n") == b"STORED\r\n"
        assert request(second, b"get k\r\n") == b"END\r\n"  # not split: k lives on worker 0
        assert request(second, b"set k 0 0 1\r\nb\r\n") == b"STORED\r\n"
        assert request(server, b"get k\r\n", b"END\r\n") == b"VALUE k 0 1\r\na\r\nEND\r\n"
        settings = request(server, b"stats settings\r\n", b"END\r\n")
        assert b"STAT maxbytes %d\r\n" % (32 * 1024 * 1024) in settings  # 64 MB split in two
        text = metrics_text(metrics_port, server.proc)  # the parent serves it, on its own time
        assert 'memcached_up{worker="0"} 1.0' in text
        assert 'memcached_up{worker="1"} 1.0' in text
        assert 'memcached_current_items{worker="1"} 1.0' in text
    finally:
        server.stop()
    assert wait_for_exit(server) is not None


def test_a_dead_worker_ends_the_server_and_no_process_is_left() -> None:
    server = start_cacheserver("-t", "2", udp=False)
    try:
        wait_for_port(server.port + 1, server.proc)
        workers = children_of(server.proc.pid)
        os.kill(workers[1], signal.SIGKILL)
        assert wait_for_exit(server) == 1
        time.sleep(0.2)
        for pid in workers:
            assert not os.path.exists(f"/proc/{pid}") or _is_zombie(pid)
    finally:
        server.stop()


def _is_zombie(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


def test_aggregated_metrics_count_evictions_udp_drops_and_refusals_per_worker() -> None:
    metrics_port = free_port()
    # 1 MB split in two: a few 100 KB values overflow worker 0.
    server = start_cacheserver("-t", "2", "-m", "1", "-c", "4", "--metrics-port", str(metrics_port))
    try:
        wait_for_port(server.port + 1, server.proc)
        value = b"x" * 100_000
        for i in range(12):
            request(server, b"set k%d 0 0 %d\r\n%s\r\n" % (i, len(value), value))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"bad", ("127.0.0.1", server.port + 1))  # shorter than a frame header
        deadline = time.monotonic() + 5
        while True:
            text = metrics_text(metrics_port, server.proc)
            dropped = 'reason="malformed",worker="1"} 1.0' in text
            if dropped or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        server.stop()
    assert 'cacheappliance_udp_dropped_datagrams_total{reason="malformed",worker="1"} 1.0' in text
    evicted = re.search(
        r'cacheappliance_evictions_total\{cause="capacity",worker="0"\} (\S+)', text
    )
    assert evicted and float(evicted.group(1)) > 0, text
    assert 'cacheappliance_evictions_total{cause="shrinker",worker="0"} 0.0' in text
    assert 'memcached_connections_rejected_total{worker="0"} 0.0' in text
    assert 'memcached_max_connections{worker="1"} 4.0' in text


def test_the_parent_reports_each_workers_latency_histogram() -> None:
    metrics_port = free_port()
    server = start_cacheserver("-t", "2", "-m", "64", "--metrics-port", str(metrics_port))
    try:
        wait_for_port(server.port + 1, server.proc)
        with socket.create_connection(server.address, timeout=5) as sock:
            for _ in range(64 * 2):  # one read per round trip: two sampled reads
                sock.sendall(b"get nothing\r\n")
                assert sock.recv(100) == b"END\r\n"
        text = metrics_text(metrics_port, server.proc)
        assert 'cacheappliance_request_duration_seconds_count{worker="0"} 2.0' in text
        assert 'cacheappliance_request_duration_seconds_count{worker="1"} 0.0' in text
    finally:
        server.stop()
