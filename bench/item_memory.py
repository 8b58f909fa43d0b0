"""Resident memory per stored item: cacheserver next to Debian's memcached holding the same data.

Each server is started on loopback with room for every item (no eviction), filled with the
same keys and values through a pipelined client (noreply sets, `--batch` per write), and
its resident memory read from /proc/PID/status before and after. One server at a time.

    .venv/bin/python bench/item_memory.py                  # 1,000,000 items of 100 bytes
    .venv/bin/python bench/item_memory.py --items 200000 --value-size 1000
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The repository root, for testkit/ (the helpers the tests and the benchmarks share).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testkit.net import free_port, wait_for_port
from testkit.procs import status_kib

MIB = 1 << 20


def key(n: int) -> bytes:
    return b"key:%010d" % n


def value(n: int, size: int) -> bytes:
    stamp = b"%010d" % n
    return (stamp * (size // len(stamp) + 1))[:size]


def request(sock: socket.socket, payload: bytes, end: bytes) -> bytes:
    sock.sendall(payload)
    data = b""
    while not data.endswith(end):
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise ConnectionError("server closed the connection")
        data += chunk
    return data


def fill(port: int, items: int, size: int, batch: int) -> float:
    """Store every item with pipelined noreply sets; returns the seconds it took."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for first in range(0, items, batch):
            sock.sendall(
                b"".join(
                    b"set %s 0 0 %d noreply\r\n%s\r\n" % (key(n), size, value(n, size))
                    for n in range(first, min(first + batch, items))
                )
            )
        # A reply to a request after the sets means every set before it was processed.
        request(sock, b"version\r\n", b"\r\n")
    return time.perf_counter() - started


def stats(port: int) -> dict[str, str]:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        reply = request(sock, b"stats\r\n", b"END\r\n").decode()
    return {p[1]: p[2] for p in (line.split(" ", 2) for line in reply.splitlines()) if len(p) == 3}


def check_values(port: int, items: int, size: int) -> None:
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for n in (0, items // 2, items - 1):
            reply = request(sock, b"get %s\r\n" % key(n), b"END\r\n")
            if value(n, size) not in reply:
                raise AssertionError(f"item {n} did not come back intact")


@dataclass
class Result:
    name: str
    rss_start: int  # bytes
    rss_full: int
    anon_full: int
    items: int
    fill_seconds: float

    @property
    def per_item(self) -> float:
        return (self.rss_full - self.rss_start) / self.items


def measure(name: str, argv: list[str], port: int, args: argparse.Namespace) -> Result:
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc, timeout=20)
        time.sleep(0.5)
        rss_start = status_kib(proc.pid, "VmRSS") * 1024
        seconds = fill(port, args.items, args.value_size, args.batch)
        time.sleep(0.5)
        st = stats(port)
        if int(st["curr_items"]) != args.items:
            raise AssertionError(f"{name} holds {st['curr_items']} of {args.items} items")
        check_values(port, args.items, args.value_size)
        return Result(
            name,
            rss_start,
            status_kib(proc.pid, "VmRSS") * 1024,
            status_kib(proc.pid, "RssAnon") * 1024,
            args.items,
            seconds,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--value-size", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1000, help="sets per write")
    parser.add_argument("--memory-mb", type=int, default=2048, help="-m for both servers")
    args = parser.parse_args()

    memcached = shutil.which("memcached")
    if memcached is None:
        sys.exit("memcached is not installed (scripts/bootstrap.sh installs it)")
    results = []
    port = free_port()
    argv = [memcached, "-m", str(args.memory_mb), "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    argv += ["-u", "root"] if os.geteuid() == 0 else []
    results.append(measure("memcached", argv, port, args))
    port = free_port()
    argv = [sys.executable, "-m", "cacheserver", "-m", str(args.memory_mb)]
    argv += ["-l", "127.0.0.1", "-p", str(port)]
    results.append(measure("cacheserver", argv, port, args))

    version = subprocess.run([memcached, "-V"], capture_output=True, text=True).stdout.strip()
    print(f"# {args.items} items, {args.value_size}-byte values, keys like {key(0).decode()}")
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"# {version}")
    print("| server | RSS at start | RSS full | anon full | bytes/item | ratio | fill |")
    print("|---|---|---|---|---|---|---|")
    base = results[0].per_item
    for r in results:
        print(
            f"| {r.name} | {r.rss_start / MIB:.1f} MiB | {r.rss_full / MIB:.1f} MiB "
            f"| {r.anon_full / MIB:.1f} MiB | {r.per_item:.0f} | {r.per_item / base:.2f}x "
            f"| {r.fill_seconds:.1f} s |"
        )


if __name__ == "__main__":
    main()
