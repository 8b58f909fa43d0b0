"""Warm restart speed: how fast a store is saved to and restored from tmpfs, and how long a
real server with a 1 GiB cache takes from SIGTERM to serving again.

1. In one process, for each value size: fill a Store to --size-mib, save it with the
   server's own code (cacheserver.warm), restore it into a new Store and check every item.
   GB/s = snapshot bytes / seconds, by the clock and by the process's CPU time (which
   other work on a shared machine disturbs less). The memory columns show what the save
   holds at once: the process's resident memory plus the snapshot on tmpfs (both count
   against a memory cgroup), sampled every 5 ms. --python-path runs the server's Python
   block loops instead of the compiled ones (storage/_snapshotio.c).
2. A real `cacheserver -e` filled to --size-mib through its TCP port, stopped with SIGTERM
   and started again: seconds to exit (the save), seconds from SIGTERM until the new
   process answers a get with the right value (stop-to-serving), and the GB/s each process
   logged.

    .venv/bin/python bench/warm_restart.py                      # 1 GiB, values 100 B-100 KiB
    .venv/bin/python bench/warm_restart.py --size-mib 256 --value-sizes 1000
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from item_memory import check_values, fill, free_port, key, stats, value, wait_for_port

from cacheserver import warm as warm_module
from cacheserver.storage import Store
from cacheserver.storage.item import ITEM_OVERHEAD
from cacheserver.storage.snapshot import COMPILED, Identity
from cacheserver.warm import WarmRestart

MIB = 1 << 20


def resident() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakSampler:
    """Largest (resident memory + snapshot file size) seen while running."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            size = 0
            for name in (self.path, self.path + ".partial"):
                with contextlib.suppress(OSError):
                    size += os.path.getsize(name)
            self.peak = max(self.peak, resident() + size)
            self._stop.wait(0.005)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def digest(store: Store) -> tuple[int, int]:
    """Item count and a crc32 of every key and item in LRU order."""
    crc = 0
    for k, item in store._items.items():
        crc = zlib.crc32(item, zlib.crc32(k, crc))
    return store.curr_items, crc


@dataclass
class InProcess:
    value_size: int
    items: int
    snapshot: int
    save_s: float
    restore_s: float
    save_cpu: float
    restore_cpu: float
    rss_full: int
    peak_save: int
    rss_after_save: int

    def row(self) -> str:
        gb = self.snapshot / 1e9
        return (
            f"| {self.value_size:,} B | {self.items:,} | {self.snapshot / MIB:,.0f} MiB "
            f"| {self.save_s:.2f} s | {gb / self.save_s:.2f} | {gb / self.save_cpu:.2f} "
            f"| {self.restore_s:.2f} s | {gb / self.restore_s:.2f} | {gb / self.restore_cpu:.2f} "
            f"| {self.rss_full / MIB:,.0f} MiB "
            f"| {self.peak_save / MIB:,.0f} MiB | {self.rss_after_save / MIB:,.0f} MiB |"
        )


def in_process(directory: str, size: int, value_size: int, repeat: int) -> InProcess:
    capacity = size * 2
    store = Store(capacity)
    items = size // (value_size + len(key(0)) + 40 + ITEM_OVERHEAD)
    now = int(time.time())
    for n in range(items):
        # Half the items with an expiry (an hour away), as a cache with TTLs holds them.
        store.set(key(n), n & 0xFFFF, 0 if n % 2 else now + 3600, value(n, value_size))
    path = os.path.join(directory, f"bench-{value_size}")
    warm = WarmRestart(path, Identity("bench", 1 << 20, 0, 1), "bench")
    saves, restores, save_cpu, restore_cpu = [], [], [], []
    rss_full = peak = after = snapshot = 0
    for _ in range(repeat):
        expected = digest(store)  # no reference to the items: the save can let them go
        rss_full = resident()
        with PeakSampler(path) as sampler:
            began, cpu = time.perf_counter(), time.process_time()
            if not warm.save(store):
                raise RuntimeError("save failed")
            saves.append(time.perf_counter() - began)
            save_cpu.append(time.process_time() - cpu)  # (the sampler's share is small)
        peak, after = sampler.peak, resident()
        snapshot = os.path.getsize(path)
        store = Store(capacity)
        began, cpu = time.perf_counter(), time.process_time()
        outcome = warm.restore(store)
        restores.append(time.perf_counter() - began)
        restore_cpu.append(time.process_time() - cpu)
        if outcome.result != "restored" or digest(store) != expected:
            raise AssertionError(f"the restore of {value_size}-byte values was not exact")
    return InProcess(
        value_size,
        items,
        snapshot,
        statistics.median(saves),
        statistics.median(restores),
        statistics.median(save_cpu),
        statistics.median(restore_cpu),
        rss_full,
        peak,
        after,
    )


@dataclass
class Server:
    items: int
    cache_bytes: int
    exit_s: float
    serving_s: float
    saved_log: str
    restored_log: str


def real_server(directory: str, size: int, value_size: int) -> Server:
    path = os.path.join(directory, "server-snapshot")
    port = free_port()
    megabytes = size * 5 // 4 // MIB
    argv = [sys.executable, "-m", "cacheserver", "-l", "127.0.0.1", "-p", str(port)]
    argv += ["-m", str(megabytes), "-e", path]
    items = size // (value_size + len(key(0)) + 40 + ITEM_OVERHEAD)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for_port(port, proc)
    fill(port, items, value_size, 1000)
    held = stats(port)
    if int(held["curr_items"]) != items:
        raise AssertionError(f"the server holds {held['curr_items']} of {items} items")
    began = time.perf_counter()
    proc.send_signal(signal.SIGTERM)
    _, first_log = proc.communicate(timeout=600)
    exited = time.perf_counter() - began
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        probe = b"get %s\r\n" % key(items - 1)
        want = value(items - 1, value_size)
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                    sock.sendall(probe)
                    reply = b""
                    while not reply.endswith(b"END\r\n"):
                        chunk = sock.recv(1 << 16)
                        if not chunk:
                            break
                        reply += chunk
                if want in reply:
                    break
                raise AssertionError("the restarted server does not have the last item")
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError("the restarted server exited") from None
                time.sleep(0.002)
        serving = time.perf_counter() - began
        check_values(port, items, value_size)
        after = stats(port)
        if int(after["curr_items"]) != items:
            raise AssertionError(f"restored {after['curr_items']} of {items} items")
    finally:
        proc.send_signal(signal.SIGINT)
        _, second_log = proc.communicate(timeout=60)
    saved = re.search(rb"saved .*", first_log)
    restored = re.search(rb"restored \d+ items .*", second_log)
    return Server(
        items,
        int(held["bytes"]),
        exited,
        serving,
        saved.group(0).decode() if saved else "(no save logged)",
        restored.group(0).decode() if restored else "(no restore logged)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="cache size (MiB)")
    parser.add_argument("--value-sizes", default="100,1000,10000,100000")
    parser.add_argument("--server-value-size", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="in-process runs (median)")
    parser.add_argument("--dir", default="/dev/shm", help="where snapshots go (tmpfs)")
    parser.add_argument("--skip-server", action="store_true")
    parser.add_argument(
        "--python-path", action="store_true", help="in process, the Python block loops"
    )
    args = parser.parse_args()
    if args.python_path:
        warm_module.COMPILED = False
        warm_module.block_writer = lambda fd: None
    size = args.size_mib * MIB
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    with open("/proc/loadavg") as f:
        print(f"# load average at start: {' '.join(f.read().split()[:3])}")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="warm-bench-") as directory:
        path = "Python" if args.python_path else "compiled" if COMPILED else "Python (not built)"
        print(f"# block loops: {path}")
        print(
            "\n| value | items | snapshot | save | save GB/s | (CPU) | restore | restore GB/s "
            "| (CPU) | RSS full | peak RSS + file during save | RSS after save |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for value_size in (int(v) for v in args.value_sizes.split(",")):
            print(in_process(directory, size, value_size, args.repeat).row(), flush=True)
        if not args.skip_server:
            server = real_server(directory, size, args.server_value_size)
            print(
                f"\nReal server, {server.items:,} items of {args.server_value_size} B "
                f"({server.cache_bytes / MIB:,.0f} MiB accounted):\n"
                f"- SIGTERM to exit (the save): {server.exit_s:.2f} s\n"
                f"- SIGTERM to serving again (restart + restore): {server.serving_s:.2f} s\n"
                f"- the first process logged: {server.saved_log}\n"
                f"- the second process logged: {server.restored_log}"
            )
    for leftover in Path(args.dir).glob("warm-bench-*"):
        print(f"warning: {leftover} left behind", file=sys.stderr)


if __name__ == "__main__":
    main()
