"""Warm restart (-e/--memory-file) of a real server process, driven by pymemcache: a graceful
stop keeps every item byte-exact (flags, CAS, expiry, LRU order), a crash keeps nothing, and a
snapshot that does not check out is refused whole, with a log line and a metric."""

from __future__ import annotations

import os
import signal
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from pymemcache.client.base import Client

from cacheserver.metrics.aggregate import fetch_stats
from servers import RunningServer, free_port, metrics_text, start_cacheserver, wait_for_port

N_KEYS = 1500


@contextmanager
def client_for(port: int) -> Iterator[Client]:
    # Replies to every set: a later request on another connection sees what was stored.
    client = Client(("127.0.0.1", port), timeout=5, connect_timeout=5, default_noreply=False)
    try:
        yield client
    finally:
        client.close()


def start(path: Path, *args: str, port: int = 0) -> RunningServer:
    return start_cacheserver("-m", "64", "-e", str(path), *args, udp=False, port=port)


def stop(server: RunningServer, sig: int = signal.SIGTERM) -> str:
    """Stop with ``sig``; returns what the server logged."""
    server.proc.send_signal(sig)
    _, err = server.proc.communicate(timeout=30)
    return err.decode(errors="replace")


def stats(port: int) -> dict[str, str]:
    got = fetch_stats("127.0.0.1", port)
    assert got is not None
    return got


def value_for(i: int) -> bytes:
    # Binary values of many sizes, CRLF and NUL included.
    return (b"%d\r\n\x00" % i) * (i % 200) + bytes(range(i % 256))


def fill(port: int) -> dict[bytes, tuple[bytes, int, bytes]]:
    """Keys with values, flags and some a long expiry; returns key -> (value, flags, cas)."""
    with client_for(port) as c:
        for i in range(N_KEYS):
            c.set(f"key:{i}", value_for(i), expire=0 if i % 2 else 3600, flags=i * 40503)
        got = {}
        for i in range(0, N_KEYS, 100):
            keys = [f"key:{j}" for j in range(i, i + 100)]
            for key, (value, cas) in c.gets_many(keys).items():
                got[key.encode()] = (value, cas)
    return {k: (v, int(k.split(b":")[1]) * 40503 % (1 << 32), cas) for k, (v, cas) in got.items()}


def read_back(port: int) -> dict[bytes, tuple[bytes, int, bytes]]:
    """key -> (value, flags, cas), read with raw gets lines so the flags come back too."""
    out: dict[bytes, tuple[bytes, int, bytes]] = {}
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for i in range(0, N_KEYS, 100):
            line = b"gets " + b" ".join(b"key:%d" % j for j in range(i, i + 100)) + b"\r\n"
            sock.sendall(line)
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = sock.recv(1 << 20)
                assert chunk
                data += chunk
            pos = 0
            while not data.startswith(b"END\r\n", pos):
                eol = data.index(b"\r\n", pos)
                _, key, flags, nbytes, cas = data[pos:eol].split(b" ")
                start = eol + 2
                value = data[start : start + int(nbytes)]
                out[key] = (value, int(flags), cas)
                pos = start + int(nbytes) + 2
    return out


def test_a_graceful_stop_keeps_every_item_byte_exact_with_flags_and_cas(
    tmp_path: Path,
) -> None:
    path = tmp_path / "cache.snapshot"
    metrics = free_port()
    server = start(path, "--metrics-port", str(metrics))
    written = fill(server.port)
    assert len(written) == N_KEYS
    before = read_back(server.port)
    stop(server)
    assert path.exists() and not Path(str(path) + ".partial").exists()

    server = start(path, "--metrics-port", str(metrics), port=server.port)
    try:
        assert not path.exists()  # used once
        after = read_back(server.port)
        assert after == before
        assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in written.items()}
        s = stats(server.port)
        assert s["warm_restart"] == "restored"
        assert s["warm_restart_restored_items"] == str(N_KEYS)
        assert s["curr_items"] == str(N_KEYS)
        with client_for(server.port) as c:  # a new CAS is above every restored one
            c.set("fresh", b"x")
            _, cas = c.gets("fresh")
            assert int(cas) > max(int(v[2]) for v in after.values())
        text = metrics_text(metrics, server.proc)
        assert f"cacheappliance_warm_restart_restored_items {float(N_KEYS)}" in text
        assert 'cacheappliance_warm_restart_info{reason="",result="restored"} 1.0' in text
    finally:
        log = stop(server, signal.SIGINT)  # SIGINT: no snapshot
    assert "restored 1500 items" in log
    assert not path.exists()


def test_expiry_is_kept_as_absolute_time_and_expired_items_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    server = start(path)
    with client_for(server.port) as c:
        c.set("short", b"1", expire=2)
        c.set("long", b"2", expire=3600)
        c.set("soon", b"3", expire=5)
        c.set("never", b"4")
    stop(server)
    time.sleep(2.5)  # "short" expires while the server is down
    server = start(path, port=server.port)
    try:
        with client_for(server.port) as c:
            assert c.get_many(["short", "long", "soon", "never"]) == {
                "long": b"2",
                "soon": b"3",
                "never": b"4",
            }
            s = stats(server.port)
            assert s["warm_restart_expired_items"] == "1"
            assert s["warm_restart_restored_items"] == "3"
            time.sleep(3)  # 5 s after it was set, not 5 s after the restart
            assert c.get("soon") is None
            assert c.get("long") == b"2"
    finally:
        stop(server)


def test_lru_order_survives_so_eviction_after_a_restart_takes_the_same_items(
    tmp_path: Path,
) -> None:
    path = tmp_path / "snap"
    server = start_cacheserver("-m", "1", "-e", str(path), udp=False)
    value = b"v" * 1000
    with client_for(server.port) as c:
        for i in range(200):
            c.set(f"k{i}", value)
        assert c.get("k0") == value  # k0 becomes the most recently used
    stop(server)
    server = start_cacheserver("-m", "1", "-e", str(path), udp=False, port=server.port)
    try:
        with client_for(server.port) as c:
            assert stats(server.port)["warm_restart_restored_items"] == "200"
            for i in range(800):  # over 1 MiB: the least recently used go first
                c.set(f"new{i}", value)
            assert int(stats(server.port)["evictions"]) > 0
            assert c.get("k1") is None
            assert c.get("k0") == value
    finally:
        stop(server)


def test_sigusr1_saves_as_well(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    server = start(path)
    with client_for(server.port) as c:
        c.set("a", b"1")
    log = stop(server, signal.SIGUSR1)
    assert "saved 1 items" in log
    server = start(path, port=server.port)
    try:
        with client_for(server.port) as c:
            assert c.get("a") == b"1"
    finally:
        stop(server)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_a_crash_or_an_interrupt_starts_empty(tmp_path: Path, sig: int) -> None:
    path = tmp_path / "snap"
    server = start(path)
    with client_for(server.port) as c:
        c.set("a", b"1")
    stop(server)  # a snapshot is written ...
    server = start(path, port=server.port)  # ... used once ...
    with client_for(server.port) as c:
        assert c.get("a") == b"1"
        c.set("b", b"2")
    stop(server, sig)  # ... and this stop writes none
    assert not path.exists()
    server = start(path, port=server.port)
    try:
        with client_for(server.port) as c:
            assert c.get_many(["a", "b"]) == {}
            s = stats(server.port)
            assert s["warm_restart"] == "none"
            assert s["curr_items"] == "0"
    finally:
        log = stop(server)
    assert "no snapshot at" in log


def _damage_truncate(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _damage_flip(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x10  # in the middle of the items
    return bytes(damaged)


def _damage_version(data: bytes) -> bytes:
    damaged = bytearray(data)
    struct.pack_into("<I", damaged, 8, struct.unpack_from("<I", data, 8)[0] + 1)
    return bytes(damaged)


@pytest.mark.parametrize(
    ("damage", "args", "reason"),
    [
        (_damage_truncate, (), "truncated"),
        (_damage_flip, (), "corrupt"),
        (_damage_version, (), "version"),
        (None, ("-m", "32"), "memory"),
        (None, ("-I", "2m"), "settings"),
    ],
    ids=["truncated", "bit-flip", "format-version", "other-memory-budget", "other-item-size"],
)
def test_a_snapshot_that_does_not_check_out_is_refused_and_nothing_is_served(
    tmp_path: Path, damage, args: tuple[str, ...], reason: str
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "snap"
    server = start_cacheserver("-m", "64", "-e", str(path), udp=False)
    fill(server.port)
    stop(server)
    if damage is not None:
        path.write_bytes(damage(path.read_bytes()))
    metrics = free_port()
    server = start_cacheserver(
        "-m",
        "64",
        "-e",
        str(path),
        "--metrics-port",
        str(metrics),
        *args,
        udp=False,
        port=server.port,
    )
    try:
        assert read_back(server.port) == {}  # zero wrong values: none at all
        s = stats(server.port)
        assert s["warm_restart"] == "refused"
        assert s["warm_restart_reason"] == reason
        assert s["curr_items"] == "0" and s["bytes"] == "0"
        text = metrics_text(metrics, server.proc)
        assert f'cacheappliance_warm_restart_info{{reason="{reason}",result="refused"}} 1.0' in text
        assert not path.exists()  # a refused snapshot is removed too
    finally:
        log = stop(server, signal.SIGINT)
    refusals = [line for line in log.splitlines() if "refused snapshot" in line]
    assert len(refusals) == 1 and f"({reason}: " in refusals[0], log


def test_a_partial_save_is_never_read_and_is_cleaned_up(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    partial = Path(str(path) + ".partial")
    partial.write_bytes(b"CSNAP\x00\r\n" + b"\x00" * 100)  # as a save killed midway leaves it
    server = start(path)
    try:
        assert stats(server.port)["warm_restart"] == "none"
        assert not partial.exists()
    finally:
        log = stop(server)
    assert "killed while saving" in log


def test_each_worker_keeps_its_own_shard(tmp_path: Path) -> None:
    path = tmp_path / "snap"
    server = start_cacheserver("-t", "2", "-m", "64", "-e", str(path), udp=False)
    wait_for_port(server.port + 1, server.proc)
    for w in (0, 1):
        with client_for(server.port + w) as c:
            for i in range(100):
                c.set(f"w{w}:{i}", b"%d:%d" % (w, i))
    stop(server)
    assert sorted(os.listdir(tmp_path)) == ["snap.0", "snap.1"]
    metrics = free_port()
    server = start_cacheserver(
        "-t", "2", "-m", "64", "-e", str(path), "--metrics-port", str(metrics), udp=False,
        port=server.port,
    )  # fmt: skip
    try:
        wait_for_port(server.port + 1, server.proc)
        for w in (0, 1):
            with client_for(server.port + w) as c:
                keys = [f"w{w}:{i}" for i in range(100)]
                assert c.get_many(keys) == {k: k[1:].encode() for k in keys}
                assert stats(server.port + w)["warm_restart_restored_items"] == "100"
                assert c.get(f"w{1 - w}:0") is None
        text = metrics_text(metrics, server.proc)
        for w in (0, 1):
            assert f'cacheappliance_warm_restart_restored_items{{worker="{w}"}} 100.0' in text
            info = f'cacheappliance_warm_restart_info{{reason="",result="restored",worker="{w}"}}'
            assert f"{info} 1.0" in text
    finally:
        stop(server)
    assert sorted(os.listdir(tmp_path)) == ["snap.0", "snap.1"]
    # Another worker count cannot use them: they are removed, and the server starts empty.
    server = start(path, port=server.port)
    try:
        assert stats(server.port)["warm_restart"] == "none"
    finally:
        log = stop(server, signal.SIGINT)
    assert os.listdir(tmp_path) == []
    assert "written by a server with another number of workers" in log


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python"])
def test_the_server_code_saves_and_restores_with_or_without_the_compiled_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compiled: bool
) -> None:
    """cacheserver.warm as the server runs it, in one process: with the compiled block
    loops (storage/_snapshotio.c) and with the Python ones an install without a compiler
    uses, the same file and the same store come back; a damaged block is refused whole."""
    from cacheserver import warm
    from cacheserver.storage import Store
    from cacheserver.storage.snapshot import COMPILED, Identity

    if compiled and not COMPILED:
        pytest.skip("cacheserver.storage._snapshotio not built")
    if not compiled:
        monkeypatch.setattr(warm, "COMPILED", False)
        monkeypatch.setattr(warm, "block_writer", lambda fd: None)
    now = int(time.time())
    store = Store(64 << 20)
    for i in range(N_KEYS):
        store.set(b"key:%d" % i, i * 40503 % (1 << 32), 0 if i % 2 else now + 3600, value_for(i))
    store.get(b"key:3")  # to the recent end
    before, used = list(store.table.items()), store.bytes_used
    path = tmp_path / "snapshot"
    identity = Identity("-m 64", 1 << 20, 0, 1)
    saver = warm.WarmRestart(str(path), identity, "test")
    assert saver.save(store) and store.curr_items == 0
    saved = path.read_bytes()

    fresh = Store(64 << 20)
    outcome = warm.WarmRestart(str(path), identity, "test").restore(fresh)
    assert (outcome.result, outcome.items) == ("restored", N_KEYS)
    assert list(fresh.table.items()) == before and fresh.bytes_used == used
    assert not path.exists()  # used once

    damaged = bytearray(saved)
    damaged[len(saved) // 2] ^= 0x10  # inside some block
    path.write_bytes(bytes(damaged))
    other = Store(64 << 20)
    outcome = warm.WarmRestart(str(path), identity, "test").restore(other)
    assert (outcome.result, outcome.reason) == ("refused", "corrupt")
    assert other.curr_items == 0 and other.bytes_used == 0
