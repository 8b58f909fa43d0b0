"""A real meta-protocol client from PyPI (meta-memcache, which speaks nothing but the meta
commands) against cacheserver: get, set, delete, CAS, counters, binary keys, and its herd
controls (stale-while-revalidate, leases, recache). Every test runs against memcached 1.6.18
too, so the expectations are memcached's."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from meta_memcache import (
    CacheClient,
    Key,
    LeasePolicy,
    RecachePolicy,
    ServerAddress,
    SetMode,
    StalePolicy,
    connection_pool_factory_builder,
)

from servers import RunningServer, start_cacheserver, start_memcached


@pytest.fixture(scope="module", params=["cacheserver", "cacheserver-python", "memcached"])
def server(request) -> Iterator[RunningServer]:
    if request.param == "memcached":
        running = start_memcached()
    else:
        running = start_cacheserver(*(["--python-only"] if "python" in request.param else []))
    yield running
    running.stop()


@pytest.fixture
def client(server: RunningServer):
    pools = connection_pool_factory_builder(connection_timeout=5, recv_timeout=5)
    return CacheClient.cache_client_from_servers(
        servers=[ServerAddress(*server.address)], connection_pool_factory_fn=pools
    )


def test_set_get_delete(client) -> None:
    assert client.set(Key("mc:a"), "hello", ttl=100)
    assert client.set(Key("mc:b"), {"nested": [1, 2]}, ttl=0)
    assert client.get(Key("mc:a")) == "hello"
    assert client.get(Key("mc:b")) == {"nested": [1, 2]}
    assert client.multi_get([Key("mc:a"), Key("mc:missing")]) == {
        Key("mc:a"): "hello",
        Key("mc:missing"): None,
    }
    assert client.delete(Key("mc:a"))
    assert client.get(Key("mc:a")) is None
    assert not client.delete(Key("mc:a"))


def test_set_modes_and_touch(client) -> None:
    key = Key("mc:modes")
    client.delete(key)
    assert client.set(key, "first", ttl=100, set_mode=SetMode.ADD)
    assert not client.set(key, "second", ttl=100, set_mode=SetMode.ADD)
    assert client.set(key, "third", ttl=100, set_mode=SetMode.REPLACE)
    assert not client.set(Key("mc:nothere"), "x", ttl=100, set_mode=SetMode.REPLACE)
    assert client.touch(key, ttl=500)
    assert client.get(key) == "third"


def test_cas(client) -> None:
    key = Key("mc:cas")
    client.set(key, "one", ttl=100)
    value, token = client.get_cas(key)
    assert value == "one"
    assert client.set(key, "two", ttl=100, cas_token=token)
    assert not client.set(key, "three", ttl=100, cas_token=token)  # the token is stale now
    assert client.get(key) == "two"


def test_counters(client) -> None:
    key = Key("mc:counter")
    client.delete(key)
    assert client.delta_and_get(key, 1) is None
    assert client.delta_initialize_and_get(key, 5, 10, initial_ttl=100) == 10
    assert client.delta_and_get(key, 5) == 15
    assert client.delta_and_get(key, -20) == 0  # decrement stops at zero


def test_binary_and_unicode_keys(client) -> None:
    # The client sends these base64-encoded with the b flag.
    assert client.set(Key("🍺:cold"), "beer", ttl=100)
    assert client.get(Key("🍺:cold")) == "beer"
    assert client.set(Key("k" * 300), "long key", ttl=100)
    assert client.get(Key("k" * 300)) == "long key"


def test_stale_while_revalidate(client) -> None:
    key = Key("mc:stale")
    policy = StalePolicy(mark_stale_on_deletion_ttl=30, mark_stale_on_cas_mismatch=True)
    client.set(key, "v1", ttl=100)
    assert client.delete(key, stale_policy=policy)  # marked stale, not deleted
    # The first reader wins the recache token: a miss with the CAS to write back with...
    value, token = client.get_cas(key)
    assert value is None and token
    # ...while everyone else keeps getting the stale value.
    assert client.get(key) == "v1"
    assert client.get(key) == "v1"
    assert client.set(key, "v2", ttl=100, cas_token=token)
    assert client.get(key) == "v2"


def test_a_late_write_after_invalidation_is_kept_stale(client) -> None:
    key = Key("mc:late")
    policy = StalePolicy(mark_stale_on_deletion_ttl=30, mark_stale_on_cas_mismatch=True)
    client.set(key, "v1", ttl=100)
    _, old_token = client.get_cas(key)
    client.delete(key, stale_policy=policy)
    # A writer that read before the invalidation: with the policy, its value is stored but
    # stays stale, so the next reader is still asked to recache.
    assert client.set(key, "late", ttl=100, cas_token=old_token, stale_policy=policy)
    value, token = client.get_cas(key)
    assert value is None and token
    assert client.get(key) == "late"


def test_lease_on_miss(client) -> None:
    key = Key("mc:lease")
    client.delete(key)
    policy = LeasePolicy(ttl=30, miss_retries=2, miss_retry_wait=0.01, miss_max_retry_wait=0.02)
    value, token = client.get_or_lease_cas(key, policy)
    assert value is None and token  # this client holds the lease
    # Another client finds the lease's placeholder, waits, and gives up with a miss.
    assert client.get_or_lease(key, policy) is None
    assert client.set(key, "filled", ttl=100, cas_token=token)
    assert client.get_or_lease(key, policy) == "filled"


def test_recache_when_the_ttl_runs_low(client) -> None:
    key = Key("mc:recache")
    client.set(key, "value", ttl=10)
    assert client.get(key, recache_policy=RecachePolicy(ttl=30)) is None  # the winner
    assert client.get(key, recache_policy=RecachePolicy(ttl=30)) == "value"
    client.set(key, "value", ttl=1000)
    assert client.get(key, recache_policy=RecachePolicy(ttl=30)) == "value"
