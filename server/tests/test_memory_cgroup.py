"""The real thing: the server in a real 256 MiB memory cgroup, written 4x that much, then
squeezed by a second process that joins the cgroup and allocates 100 MiB.

memcached -m 256 in such a cgroup is OOM-killed; cacheserver -m auto must not be, must keep
answering, and must never hand back a corrupted value. Needs a writable memory cgroup (root
on a host with cgroup v1 or v2); skipped with the reason otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheError

from cacheserver.memory import PressureLevel
from cacheserver.memory.cgroupfs import CgroupDir, CgroupError, locate_memory_cgroup
from cacheserver.memory.pressure import watcher_for
from servers import free_port, wait_for_port

MIB = 1 << 20
LIMIT = 256 * MIB
VALUE_SIZE = 64 * 1024
SIDECAR = 100 * MIB


@dataclass
class MemoryCgroup:
    """A child memory cgroup of the test's own, with a limit, that processes can join."""

    path: Path
    version: int

    @classmethod
    def create(cls, parent: CgroupDir, name: str, limit: int) -> MemoryCgroup:
        path = parent.path / name
        path.mkdir()
        group = cls(path, parent.version)
        try:
            if parent.version == 1:
                (path / "memory.limit_in_bytes").write_text(str(limit))
            else:
                (path / "memory.max").write_text(str(limit))
                (path / "memory.swap.max").write_text("0")
        except OSError:
            group.remove()
            raise
        return group

    def wrap(self, argv: list[str]) -> list[str]:
        """A command that joins this cgroup, then execs argv (so the pid is argv's)."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "join-cgroup", *argv]

    def read(self, name: str) -> dict[str, int]:
        values = {}
        for line in (self.path / name).read_text().splitlines():
            key, _, value = line.partition(" ")
            values[key] = int(value)
        return values

    def oom_kills(self) -> int:
        if self.version == 1:
            return self.read("memory.oom_control").get("oom_kill", 0)
        return self.read("memory.events").get("oom_kill", 0)

    def usage(self) -> int:
        name = "memory.usage_in_bytes" if self.version == 1 else "memory.current"
        return int((self.path / name).read_text())

    def limit_hits(self) -> int:
        """How often usage reached the limit (the kernel then reclaims, or kills)."""
        if self.version == 1:
            return int((self.path / "memory.failcnt").read_text())
        return self.read("memory.events").get("max", 0)

    def peak(self) -> int:
        name = "memory.max_usage_in_bytes" if self.version == 1 else "memory.peak"
        return int((self.path / name).read_text())

    def pids(self) -> list[int]:
        return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]

    def remove(self) -> None:
        deadline = time.monotonic() + 10
        while self.path.exists() and time.monotonic() < deadline:
            try:
                self.path.rmdir()
            except OSError:
                time.sleep(0.1)  # the last process is still exiting


def writable_memory_cgroup_parent() -> CgroupDir:
    try:
        cgroup, _ = locate_memory_cgroup("/")
    except CgroupError as exc:
        pytest.skip(f"no memory cgroup on this machine: {exc}")
    probe = cgroup.path / f"cachetest-probe-{os.getpid()}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        pytest.skip(f"memory cgroup {cgroup.display} is not writable here: {exc.strerror}")
    if cgroup.version == 2:
        controllers = (cgroup.path / "cgroup.subtree_control").read_text().split()
        if "memory" not in controllers:
            pytest.skip(
                f"cgroup2 {cgroup.display} does not delegate the memory controller to children"
            )
    return cgroup


@pytest.fixture
def cgroup() -> Iterator[MemoryCgroup]:
    parent = writable_memory_cgroup_parent()
    group = MemoryCgroup.create(parent, f"cachetest-{os.getpid()}-{time.monotonic_ns()}", LIMIT)
    yield group
    for pid in group.pids():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)
    group.remove()


def value_for(key: str) -> bytes:
    """64 KiB derived from the key, so any mix-up or corruption shows."""
    seed = hashlib.blake2b(key.encode(), digest_size=64).digest()
    return seed * (VALUE_SIZE // len(seed))


def stats(client: Client, *sub: str) -> dict[str, str]:
    return {
        k.decode(): v.decode() if isinstance(v, bytes) else str(v)
        for k, v in client.stats(*sub).items()
    }


SIDECAR_CODE = """
import sys, time
chunk, total, pause = (int(a) for a in sys.argv[1:4])
held = []
while sum(map(len, held)) < total:
    held.append(b"\\x01" * chunk)  # written, so every page is really there
    time.sleep(pause / 1000)
print("allocated", sum(map(len, held)), flush=True)
sys.stdin.read()  # hold it until the test closes our stdin
"""
# The sidecar grows by 4 MiB every 40 ms: 100 MiB/s, its interpreter's start-up on top.
SIDECAR_CHUNK, SIDECAR_PAUSE_MS = 4 * MIB, 40


def start_server(cgroup: MemoryCgroup, port: int, log: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "cacheserver", "-m", "auto", "-v"]
    argv += ["-l", "127.0.0.1", "-p", str(port)]
    with log.open("wb") as out:
        server = subprocess.Popen(cgroup.wrap(argv), stdout=subprocess.DEVNULL, stderr=out)
    wait_for_port(port, server)
    return server


def start_sidecar(cgroup: MemoryCgroup) -> subprocess.Popen[bytes]:
    args = [str(SIDECAR_CHUNK), str(SIDECAR), str(SIDECAR_PAUSE_MS)]
    return subprocess.Popen(
        cgroup.wrap([sys.executable, "-c", SIDECAR_CODE, *args]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )


def readable(stream: object) -> bool:
    ready, _, _ = select.select([stream], [], [], 0)
    return bool(ready)


def summary(stats: dict[str, str], *names: str) -> str:
    return " ".join(
        f"{name}={int(stats[name]) / MIB:.1f}MiB"
        if stats[name].isdigit() and int(stats[name]) > MIB
        else f"{name}={stats[name]}"
        for name in names
    )


def test_server_survives_its_cgroup_limit_and_a_sidecar(
    cgroup: MemoryCgroup, tmp_path: Path
) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    server = start_server(cgroup, port, log)
    sidecar = None
    try:
        assert cgroup.pids() == [server.pid]
        client = Client(("127.0.0.1", port), connect_timeout=5, timeout=10)
        settings = stats(client, "settings")
        assert settings["memory_limit"] == str(LIMIT)
        assert settings["memory_limit_source"].startswith(f"cgroup{cgroup.version}:")
        assert settings["memory_limit_source"].endswith(
            "/memory.limit_in_bytes" if cgroup.version == 1 else "/memory.max"
        )
        capacity = int(settings["memory_capacity"])
        assert 100 * MIB < capacity < LIMIT - 32 * MIB

        # Phase 1: four times the limit, in 64 KiB values, 16 per round trip.
        keys = [f"key:{n:06d}" for n in range(4 * LIMIT // VALUE_SIZE)]
        for start in range(0, len(keys), 16):
            batch = {k: value_for(k) for k in keys[start : start + 16]}
            assert client.set_many(batch, noreply=False) == []
        assert server.poll() is None, "the server died while being filled"
        assert cgroup.oom_kills() == 0
        assert cgroup.limit_hits() == 0, "the cgroup reached its limit while being filled"
        filled = stats(client)
        assert int(filled["evictions_capacity"]) > 0
        assert int(filled["bytes"]) <= int(filled["limit_maxbytes"]) <= capacity
        assert client.get(keys[-1]) == value_for(keys[-1])  # the latest write, intact
        assert client.get(keys[0]) is None  # the oldest, evicted

        # Phase 2: a second process joins the cgroup and takes 100 MiB, touching every page,
        # while a client keeps reading and writing.
        sidecar = start_sidecar(cgroup)
        assert sidecar.stdout is not None
        served, line = 0, b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sidecar.poll() is None:
            key = keys[-1 - (served % 512)]
            got = client.get(key)
            assert got is None or got == value_for(key), f"{key} came back corrupted"
            fresh = f"late:{served:06d}"
            assert client.set(fresh, value_for(fresh), noreply=False)
            served += 1
            if readable(sidecar.stdout):
                line = sidecar.stdout.readline()
                break
        assert line.startswith(b"allocated"), (
            f"the sidecar did not get its 100 MiB (exit code {sidecar.poll()}, "
            f"{cgroup.oom_kills()} OOM kills in the cgroup)"
        )
        assert server.poll() is None, "the server was killed"
        assert cgroup.oom_kills() == 0
        assert cgroup.limit_hits() == 0, "the cgroup reached its limit"

        squeezed = stats(client)
        assert int(squeezed["memory_shrink_events"]) >= 1
        assert int(squeezed["evictions_shrinker"]) > 0
        # The sidecar's 100 MiB came out of the store (a little was free heap).
        assert int(squeezed["memory_bytes_released"]) >= 50 * MIB
        assert int(squeezed["limit_maxbytes"]) < capacity  # held lower while squeezed

        # Every value is the one written, or a miss: never anything else.
        for start in range(0, len(keys), 64):
            for key, got in client.get_many(keys[start : start + 64]).items():
                assert got == value_for(key), f"{key} came back corrupted"
        last = f"late:{served - 1:06d}"
        assert client.get(last) == value_for(last)

        # The sidecar leaves; the server is still there and serving.
        assert sidecar.stdin is not None
        sidecar.stdin.close()
        sidecar.wait(timeout=10)
        assert client.set("after", b"ok", noreply=False)
        assert client.get("after") == b"ok"
        assert server.poll() is None and cgroup.oom_kills() == 0
        client.close()
        names = ("memory_working_set", "bytes", "limit_maxbytes", "curr_items")
        print(f"\nfilled: capacity={capacity / MIB:.1f}MiB {summary(filled, *names)}")
        print(
            "squeezed: "
            + summary(
                squeezed,
                *names,
                "memory_shrink_events",
                "memory_bytes_released",
                "evictions_shrinker",
                "memory_trimmed_bytes",
            )
            + f" cgroup peak={cgroup.peak() / MIB:.1f}MiB served={served}"
        )
    finally:
        for proc in (sidecar, server):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        print(log.read_text(errors="replace")[-3000:])


def test_memcached_with_a_fixed_size_is_killed_in_the_same_cgroup(cgroup: MemoryCgroup) -> None:
    """The baseline this server is measured against, and proof the harness sees a kill:
    Debian's memcached told -m 256 inside a 256 MiB cgroup, fed 1 GiB of 64 KiB values."""
    binary = shutil.which("memcached")
    if binary is None:
        pytest.fail("memcached is not installed: run scripts/bootstrap.sh (make test does)")
    port = free_port()
    argv = [binary, "-m", "256", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    argv += ["-u", "root"] if os.geteuid() == 0 else []
    memcached = subprocess.Popen(cgroup.wrap(argv), stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, memcached)
        client = Client(("127.0.0.1", port), connect_timeout=5, timeout=10)
        keys = [f"key:{n:06d}" for n in range(4 * LIMIT // VALUE_SIZE)]
        with contextlib.suppress(OSError, MemcacheError):
            for start in range(0, len(keys), 16):
                client.set_many({k: value_for(k) for k in keys[start : start + 16]})
        memcached.wait(timeout=10)
        assert memcached.returncode == -9
        assert cgroup.oom_kills() >= 1
    finally:
        if memcached.poll() is None:
            memcached.kill()
            memcached.wait(timeout=10)


def test_kernel_pressure_notifications_arrive(cgroup: MemoryCgroup) -> None:
    """The v1 pressure_level eventfds, registered as the server does, fire when a process
    in the cgroup runs into the limit."""
    if cgroup.version != 1:
        pytest.skip("cgroup v2 PSI triggers need seconds of stall; only v1 events are checked")
    watcher = watcher_for(CgroupDir(1, cgroup.path, cgroup.path.parent, Path("/")))
    levels: list[PressureLevel] = []
    hog = "chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 20))\n"

    async def squeeze() -> int:
        watcher.start(asyncio.get_running_loop(), levels.append)
        try:
            proc = await asyncio.create_subprocess_exec(*cgroup.wrap([sys.executable, "-c", hog]))
            code = await asyncio.wait_for(proc.wait(), 60)
            await asyncio.sleep(0.2)  # let the loop read what the kernel signalled last
            return code
        finally:
            watcher.close()

    assert asyncio.run(squeeze()) == -9  # the hog is OOM-killed: nobody freed memory for it
    assert PressureLevel.CRITICAL in levels, f"pressure levels seen: {levels}"
