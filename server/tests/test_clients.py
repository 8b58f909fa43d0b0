"""Real memcached clients against a real cacheserver: pymemcache for every command, and
libmemcached's own test tools (memccapable, memcaslap)."""

from __future__ import annotations

import shutil
import subprocess
import time

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheClientError, MemcacheIllegalInputError

from servers import RunningServer, memcaslap_totals, start_memcached


@pytest.fixture
def client(cacheserver: RunningServer):
    c = Client(cacheserver.address, connect_timeout=5, timeout=5)
    yield c
    c.close()


def test_set_get_and_multi_get(client: Client) -> None:
    assert client.set("a", b"1", expire=0)
    assert client.set("b", b"\x00\r\nbinary\xff", flags=0)
    assert client.get("a") == b"1"
    assert client.get("b") == b"\x00\r\nbinary\xff"
    assert client.get_many(["a", "b", "missing"]) == {"a": b"1", "b": b"\x00\r\nbinary\xff"}
    assert client.get("missing") is None


def test_add_replace_append_prepend(client: Client) -> None:
    assert client.add("k", b"v", noreply=False)
    assert not client.add("k", b"other", noreply=False)
    assert client.replace("k", b"w", noreply=False)
    assert not client.replace("nope", b"x", noreply=False)
    assert client.append("k", b"-end", noreply=False)
    assert client.prepend("k", b"start-", noreply=False)
    assert client.get("k") == b"start-w-end"
    assert not client.append("nope", b"x", noreply=False)


def test_gets_and_cas(client: Client) -> None:
    client.set("c", b"one")
    value, token = client.gets("c")
    assert value == b"one"
    assert client.cas("c", b"two", token, noreply=False) is True
    assert client.cas("c", b"three", token, noreply=False) is False  # token is stale now
    assert client.cas("missing", b"x", b"1", noreply=False) is None
    assert client.get("c") == b"two"
    many = client.gets_many(["c", "missing"])
    assert list(many) == ["c"] and many["c"][0] == b"two"


def test_incr_decr(client: Client) -> None:
    client.set("n", b"10")
    assert client.incr("n", 5, noreply=False) == 15
    assert client.decr("n", 100, noreply=False) == 0
    assert client.incr("missing", 1, noreply=False) is None
    client.set("max", b"18446744073709551615")
    assert client.incr("max", 2, noreply=False) == 1  # 64-bit wrap, as memcached
    client.set("text", b"abc")
    with pytest.raises(MemcacheClientError, match="non-numeric"):
        client.incr("text", 1, noreply=False)


def test_delete_touch_gat(client: Client) -> None:
    client.set("d", b"x")
    assert client.delete("d", noreply=False)
    assert not client.delete("d", noreply=False)
    client.set("t", b"y", expire=100)
    assert client.touch("t", expire=1, noreply=False)
    assert not client.touch("missing", noreply=False)
    # pymemcache has no gat/gats: raw_command returns the reply without its END line.
    assert client.raw_command(b"gat 100 t", b"END\r\n") == b"VALUE t 0 1\r\ny\r\n"
    reply = client.raw_command(b"gats 100 t", b"END\r\n")
    assert reply.startswith(b"VALUE t 0 1 ") and reply.endswith(b"\r\ny\r\n")
    client.set("short", b"z", expire=1)
    time.sleep(2.1)
    assert client.get("short") is None


def test_expired_items_vanish_and_negative_exptime_is_expired(client: Client) -> None:
    client.set("neg", b"x", expire=-1)
    assert client.get("neg") is None


def test_flush_all_stats_version_verbosity_noreply(client: Client) -> None:
    client.set("x", b"1", noreply=True)
    assert client.get("x") == b"1"
    assert client.flush_all(noreply=False)
    assert client.get("x") is None
    assert client.version().startswith(b"1.6")
    assert client.raw_command(b"verbosity 1") == b"OK"
    stats = client.stats()
    assert stats[b"cmd_get"] >= 2
    assert stats[b"curr_connections"] >= 1
    settings = client.stats("settings")
    assert settings[b"item_size_max"] == 1024 * 1024
    client.set("i", b"1")
    items = client.stats("items")
    assert items[b"items:1:number"] == 1
    assert b"total_malloced" in client.stats("slabs")


def test_key_and_value_limits(client: Client) -> None:
    assert client.set("k" * 250, b"ok")
    assert client.get("k" * 250) == b"ok"
    with pytest.raises(MemcacheIllegalInputError):
        client.set("k" * 251, b"too long")
    with pytest.raises(Exception, match="object too large"):
        client.set("big", b"x" * (2 * 1024 * 1024), noreply=False)
    assert client.get("big") is None


def _require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: run scripts/bootstrap.sh (make test does)")
    return path


def _memccapable(server: RunningServer) -> subprocess.CompletedProcess[str]:
    cmd = [_require("memccapable"), "-a", "-h", "127.0.0.1", "-p", str(server.port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_memccapable_ascii_passes_every_test(cacheserver: RunningServer) -> None:
    result = _memccapable(cacheserver)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "All tests passed" in result.stdout
    assert "[fail]" not in result.stdout


def test_memccapable_against_memcached_in_the_same_run() -> None:
    """The reference: the same tool against memcached itself (reported if it fails there)."""
    server = start_memcached()
    try:
        result = _memccapable(server)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr


def test_memcaslap_over_udp_finishes_without_errors(cacheserver: RunningServer) -> None:
    """Dozens of concurrent UDP requests (32 in flight) for a few seconds."""
    server = f"127.0.0.1:{cacheserver.udp_port}"
    cmd = [_require("memcaslap"), "-s", server, "--udp", "-c", "32", "-T", "1", "-t", "3s"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    totals = memcaslap_totals(output)
    assert totals.get("cmd_get", 0) > 1000 and totals.get("cmd_set", 0) > 100, output
    for error in ("packet_drop", "packet_disorder", "udp_timeout"):
        assert totals.get(error) == 0, output


@pytest.mark.parametrize(
    "extra",
    [[], ["--division=16"], ["--exp_verify=0.1"]],
    ids=["get", "multi-get-16", "with-expiring-items"],
)
def test_memcaslap_verifies_every_value_it_reads_back(
    cacheserver: RunningServer, extra: list[str]
) -> None:
    """32 connections for two seconds (the compiled fast path and the Python path mixed, as
    sets with an exptime take the Python one); memcaslap checks each value it gets back."""
    server = f"127.0.0.1:{cacheserver.port}"
    cmd = [_require("memcaslap"), "-s", server, "-c", "32", "-T", "1", "-t", "2s"]
    cmd += ["--verify=1.0", *extra]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    totals = memcaslap_totals(output)
    assert totals.get("cmd_get", 0) > 1000 and totals.get("cmd_set", 0) > 100, output
    assert totals.get("verify_failed") == 0 and totals.get("verify_misses") == 0, output
