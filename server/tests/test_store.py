"""The storage layer on its own: capacity, LRU order, expiry, CAS, counters."""

from __future__ import annotations

from cacheserver.storage import Outcome, Store
from cacheserver.storage.item import item_cost, item_data, item_flags, make_item
from cacheserver.storage.store import BUMP_INTERVAL


class FakeClock:
    """Time the test controls; the store reads it through its clock parameter."""

    def __init__(self, now: float = 1_700_000_000) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_item_layout_round_trips() -> None:
    item = make_item(cas=7, exptime=0, flags=42, data=b"a\r\nb")
    assert item_data(item) == b"a\r\nb"
    assert item_flags(item) == 42
    assert item_cost(b"k", item) >= len(item) + 1


def test_capacity_is_never_exceeded_and_lru_goes_first() -> None:
    value = b"x" * 100
    cost = item_cost(b"key:0000", make_item(1, 0, 0, value))
    store = Store(capacity=cost * 100)
    for i in range(100):
        assert store.set(b"key:%04d" % i, 0, 0, value) is Outcome.STORED
    assert store.get(b"key:0000") is not None  # now the most recently used
    for i in range(100, 150):
        store.set(b"key:%04d" % i, 0, 0, value)
        assert store.bytes_used <= store.capacity
    assert store.get(b"key:0000") is not None, "recently read key was evicted"
    assert store.get(b"key:0001") is None, "least recently used key survived"
    assert store.get(b"key:0149") is not None
    assert store.stats.evictions >= 50
    assert store.stats.evicted_unfetched >= 49  # key:0000 was fetched, the rest were not


def test_a_hit_moves_an_item_at_most_once_per_bump_interval() -> None:
    # memcached's rule (ITEM_UPDATE_INTERVAL): a hot key is not re-inserted on every read.
    clock = FakeClock()
    store = Store(capacity=1 << 20, clock=clock)
    for key in (b"a", b"b", b"c"):
        store.set(key, 0, 0, b"v")
    store.get(b"a")  # first hit: moves
    assert list(store.table) == [b"b", b"c", b"a"]
    store.set(b"d", 0, 0, b"v")
    clock.now += BUMP_INTERVAL - 1
    store.get(b"a")  # hit again within the interval: stays where it is
    assert list(store.table) == [b"b", b"c", b"a", b"d"]
    clock.now += 1
    store.get(b"a")  # the interval has passed: moves again
    assert list(store.table) == [b"b", b"c", b"d", b"a"]


def test_lazy_expiry_counts_expired_unfetched_and_reclaimed() -> None:
    clock = FakeClock()
    store = Store(capacity=1 << 20, clock=clock)
    store.set(b"a", 0, int(clock.now) + 10, b"1")
    store.set(b"b", 0, int(clock.now) + 10, b"2")
    assert store.get(b"b") is not None
    clock.now += 10
    assert store.get(b"a") is None and store.get(b"b") is None
    assert store.stats.reclaimed == 2
    assert store.stats.expired_unfetched == 1
    assert store.stats.get_expired == 2
    assert store.curr_items == 0 and store.bytes_used == 0


def test_background_crawler_reclaims_expired_items_without_reads() -> None:
    clock = FakeClock()
    store = Store(capacity=1 << 24, clock=clock)
    for i in range(1000):
        store.set(b"t%d" % i, 0, int(clock.now) + 5 if i % 2 else 0, b"v")
    clock.now += 6
    reclaimed = 0
    for _ in range(10):  # bounded steps of 300 keys each
        reclaimed += store.reclaim_expired(budget=300)
    assert reclaimed == 500
    assert store.curr_items == 500
    assert store.stats.reclaimed == 500


def test_cas_uniques_change_on_every_update() -> None:
    store = Store(capacity=1 << 20)
    store.set(b"k", 0, 0, b"1")
    from cacheserver.storage.item import item_cas

    first = item_cas(store.get(b"k"))
    assert store.cas(b"k", 0, 0, b"2", first + 1) is Outcome.EXISTS
    assert store.cas(b"k", 0, 0, b"2", first) is Outcome.STORED
    second = item_cas(store.get(b"k"))
    assert second != first
    store.append(b"k", b"3")
    assert item_cas(store.get(b"k")) not in (first, second)


def test_incr_wraps_and_decr_floors_like_memcached() -> None:
    store = Store(capacity=1 << 20)
    store.set(b"n", 0, 0, b"18446744073709551615")
    assert store.incr(b"n", 1) == 0
    store.set(b"n", 0, 0, b"5")
    assert store.decr(b"n", 10) == 0
    store.set(b"n", 0, 0, b"100")
    assert store.decr(b"n", 1) == 99
    assert item_data(store.get(b"n")) == b"99 "  # padded in place, as memcached does
    store.set(b"s", 0, 0, b"abc")
    assert store.incr(b"s", 1) is Outcome.NON_NUMERIC
    assert store.incr(b"missing", 1) is Outcome.NOT_FOUND


def test_delayed_flush_drops_items_that_exist_at_that_time() -> None:
    clock = FakeClock()
    store = Store(capacity=1 << 20, clock=clock)
    store.set(b"a", 0, 0, b"1")
    store.flush(at=int(clock.now) + 5)
    assert store.get(b"a") is not None
    clock.now += 5
    assert store.get(b"a") is None
    store.set(b"b", 0, 0, b"2")
    assert store.get(b"b") is not None


def test_shrink_and_set_capacity_count_evictions_by_cause() -> None:
    store = Store(capacity=1 << 20)
    for i in range(1000):
        store.set(b"k%d" % i, 0, 0, b"v" * 100)
    used = store.bytes_used
    released = store.shrink(used // 2)
    assert store.bytes_used <= used // 2
    assert released == used - store.bytes_used
    assert store.stats.evictions_shrinker > 0 and store.stats.evictions == 0
    store.set_capacity(store.bytes_used // 2)
    assert store.bytes_used <= store.capacity
    assert store.stats.evictions > 0


def test_item_larger_than_capacity_is_refused_not_stored() -> None:
    store = Store(capacity=1000)
    assert store.set(b"k", 0, 0, b"x" * 2000) is Outcome.NO_MEMORY
    assert store.curr_items == 0
