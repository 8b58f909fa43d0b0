"""The meta protocol on the protocol layer alone (no socket), with a clock the test moves.

test_meta_differential.py compares every reply byte with memcached 1.6.18 but leaves out
what depends on the clock (remaining TTLs, seconds since the last access); this file checks
those numbers, the LRU effects of the flags, and the stale-while-revalidate state over time.
"""

from __future__ import annotations

import pytest
from test_fastpath import Clock

from cacheserver.metrics.counters import Counters
from cacheserver.protocol.commands import Commands
from cacheserver.protocol.meta import decode_key
from cacheserver.protocol.session import TextSession
from cacheserver.storage import Store
from cacheserver.storage.item import KEY_BINARY, STALE, TOKEN_SENT, item_marks


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> Store:
    return Store(1 << 20, clock=clock)


@pytest.fixture
def counters() -> Counters:
    return Counters()


@pytest.fixture
def session(store: Store, counters: Counters) -> TextSession:
    return TextSession(Commands(store, counters, "test"))


def test_ttl_and_last_access_follow_the_clock(session: TextSession, clock: Clock) -> None:
    assert session.feed(b"ms k 2 T100\r\nab\r\n") == b"HD\r\n"
    clock.now += 30
    assert session.feed(b"mg k t l\r\n") == b"HD t70 l30\r\n"
    # That mg was the first hit: it moved the item, so the last access is now.
    clock.now += 5
    assert session.feed(b"mg k t l\r\n") == b"HD t65 l5\r\n"
    assert session.feed(b"me k\r\n") == b"ME k exp=-65 la=5 cas=1 fetch=yes cls=1 size=62\r\n"
    assert session.feed(b"mg k T0 t\r\n") == b"HD t-1\r\n"
    clock.now += 10**6
    assert session.feed(b"mg k v\r\n") == b"VA 2\r\nab\r\n"


def test_an_item_expires_for_meta_as_for_get(session: TextSession, clock: Clock) -> None:
    session.feed(b"ms k 1 T2\r\nx\r\n")
    clock.now += 2
    assert session.feed(b"mg k v\r\nme k\r\nmd k\r\nma k\r\n") == b"EN\r\nEN\r\nNF\r\nNF\r\n"


def test_mg_counts_a_hit_and_moves_the_item_unless_told_not_to(
    session: TextSession, store: Store, counters: Counters
) -> None:
    session.feed(b"ms a 1\r\n1\r\nms b 1\r\n2\r\n")
    assert session.feed(b"mg a u h\r\n") == b"HD h0\r\n"
    assert list(store.table) == [b"a", b"b"]  # u: no LRU bump, not marked fetched
    assert session.feed(b"mg a h\r\n") == b"HD h0\r\n"
    assert list(store.table) == [b"b", b"a"]
    assert session.feed(b"mg a h\r\n") == b"HD h1\r\n"
    assert session.feed(b"mg a T10\r\nmg nope\r\n") == b"HD\r\nEN\r\n"
    assert (counters.cmd_get, counters.get_hits, counters.get_misses) == (4, 3, 1)
    assert (counters.cmd_touch, counters.touch_hits) == (1, 1)


def test_stale_while_revalidate_over_time(session: TextSession, store: Store, clock: Clock) -> None:
    session.feed(b"ms k 3 T600\r\nold\r\n")
    # Invalidate with a short TTL: the value stays readable while one client recaches it.
    assert session.feed(b"md k I T30\r\n") == b"HD\r\n"
    assert item_marks(store.peek(b"k")) == STALE
    assert session.feed(b"mg k v t c\r\n") == b"VA 3 t30 c2 X W\r\nold\r\n"
    assert item_marks(store.peek(b"k")) == STALE | TOKEN_SENT
    clock.now += 10
    assert session.feed(b"mg k v t\r\n") == b"VA 3 t20 Z X\r\nold\r\n"
    # The winner's set with the CAS it saw replaces the stale value.
    assert session.feed(b"ms k 3 C2 T600\r\nnew\r\n") == b"HD\r\n"
    assert item_marks(store.peek(b"k")) == 0
    assert session.feed(b"mg k v t\r\n") == b"VA 3 t600\r\nnew\r\n"
    # A late writer with an older CAS and I: stored, but still stale, keeping TTL and token.
    session.feed(b"md k I\r\nmg k\r\n")
    assert session.feed(b"ms k 4 C1 I T5\r\nlate\r\n") == b"HD\r\n"
    assert session.feed(b"mg k v t\r\n") == b"VA 4 t600 Z X\r\nlate\r\n"


def test_recache_token_once_the_ttl_runs_low(session: TextSession, clock: Clock) -> None:
    session.feed(b"ms k 1 T100\r\nx\r\n")
    assert session.feed(b"mg k R30\r\n") == b"HD\r\n"
    clock.now += 75
    assert session.feed(b"mg k R30\r\n") == b"HD W\r\n"
    assert session.feed(b"mg k R30\r\n") == b"HD Z\r\n"


def test_vivify_hands_the_token_to_the_first_miss_only(session: TextSession) -> None:
    assert session.feed(b"mg k N30 v t s\r\n") == b"VA 0 t30 s0 W\r\n\r\n"
    assert session.feed(b"mg k N30 v\r\n") == b"VA 0 Z\r\n\r\n"
    assert session.feed(b"ms k 3\r\nnew\r\nmg k N30 v\r\n") == b"HD\r\nVA 3\r\nnew\r\n"


def test_touch_and_incr_keep_the_marks_memcached_keeps(session: TextSession, store: Store) -> None:
    session.feed(b"ms bnVt 2 b\r\n10\r\n")
    assert item_marks(store.peek(b"num")) == KEY_BINARY
    session.feed(b"touch num 100\r\nma num\r\n")  # in place: 11 fits where 10 was
    assert item_marks(store.peek(b"num")) == KEY_BINARY
    assert session.feed(b"mg num k v\r\n") == b"VA 2 kbnVt b\r\n11\r\n"
    # A number that no longer fits is a new item: no marks, and ma's new TTL is lost.
    session.feed(b"ms num 2 T100\r\n99\r\n")
    assert session.feed(b"ma num T500 v\r\nmg num t k\r\n") == b"VA 3\r\n100\r\nHD t100 knum\r\n"


def test_quiet_mode_leaves_out_only_the_nominal_replies(session: TextSession) -> None:
    batch = b"ms a 1 q\r\n1\r\nms a 1 q ME\r\n2\r\nmg a q v\r\nmg b q v\r\n"
    batch += b"md b q\r\nmd a q\r\nmn\r\n"
    assert session.feed(batch) == b"NS\r\nVA 1\r\n1\r\nNF\r\nMN\r\n"


@pytest.mark.parametrize(
    ("raw", "key"),
    [
        (b"Zm9v", b"foo"),
        (b"Zm9vYg==", b"foob"),
        (b"Zm9vYmE=", b"fooba"),
        (b"Zm!9v", b"foo"),  # memcached skips characters outside the alphabet
        (b"YQ==YmFy", b"a"),  # and stops after the first padded group
        (b"Y=Q=", b"`"),
        (b"Zm9", None),
        (b"Y===", None),
        (b"!!!!", None),
    ],
)
def test_base64_keys_decode_as_memcached_decodes_them(raw: bytes, key: bytes | None) -> None:
    assert decode_key(raw) == key
