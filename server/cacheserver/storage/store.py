"""The item store: a byte-capacity cache with LRU eviction, lazy and background expiry, CAS.

One ``Store`` belongs to one worker (shard-per-core), so nothing here takes a lock. LRU order
is the dict's insertion order: a hit re-inserts the key at the end, eviction takes keys from
the front. As in memcached (ITEM_UPDATE_INTERVAL), a hit moves an item at most once per
``BUMP_INTERVAL``: a hot key is not re-inserted on every read, which would cost a dict
delete, an insert and, every so often, a resize of the whole dict. Evicting in small batches
(to a low watermark just under capacity) keeps the scan past the deleted slots at the dict's
front amortised to a few steps per item.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol, TypeVar

from cacheserver.storage.item import (
    BUMPED_AT,
    FETCHED,
    HEADER_SIZE,
    ITEM_OVERHEAD,
    META_AT,
    NEVER,
    STALE,
    TOKEN_SENT,
    as_bumped,
    item_cost,
    item_data,
    item_fetched,
    make_item,
    pack_header,
    unpack_header,
    with_fetched,
    with_header,
)

MAX_U64 = (1 << 64) - 1
BUMP_INTERVAL = 60  # seconds; memcached's ITEM_UPDATE_INTERVAL
# memcached's item header (48) + CAS (8) + the key's NUL: used to apply -I the way it does.
MEMCACHED_ITEM_OVERHEAD = 48 + 8 + 1


class Filled(Protocol):
    count: int
    nbytes: int


_Filled = TypeVar("_Filled", bound=Filled)


class Outcome(Enum):
    STORED = auto()
    NOT_STORED = auto()
    EXISTS = auto()
    NOT_FOUND = auto()
    TOO_LARGE = auto()
    NO_MEMORY = auto()
    NON_NUMERIC = auto()


@dataclass
class StoreStats:
    """Counters owned by the store; plain ints, read by stats and the metrics collector."""

    total_items: int = 0
    evictions: int = 0  # valid items evicted to stay under capacity
    evictions_shrinker: int = 0  # valid items evicted because the memory shrinker asked
    evicted_unfetched: int = 0
    expired_unfetched: int = 0
    reclaimed: int = 0  # expired items whose memory was taken back (lazily or by the crawler)
    get_expired: int = 0
    get_flushed: int = 0
    crawler_items_checked: int = 0
    bytes_released_shrinker: int = 0


class Store:
    def __init__(
        self,
        capacity: int,
        max_item_size: int = 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._items: dict[bytes, bytes] = {}
        self.capacity = capacity
        self.max_item_size = max_item_size
        self.bytes_used = 0
        self.stats = StoreStats()
        self.clock = clock
        self.last_cas = 0  # the CAS value handed out last
        self.flush_at = 0  # absolute time of a pending delayed flush_all, 0 when none
        self._crawl_keys: list[bytes] = []

    # -- what the compiled fast path uses (cacheserver/fastpath/boundary.py declares it) ------
    # Besides these: ``clock``, ``stats``, ``last_cas``, ``bytes_used``, ``capacity``,
    # ``max_item_size`` and ``flush_at`` above. The fast path changes items by this module's
    # rules (get's LRU bump, _store's accounting); ``last_cas`` and ``bytes_used`` are handed
    # back before any Python code runs.

    @property
    def table(self) -> dict[bytes, bytes]:
        """The items: key -> item bytes, least recently used first. The same dict for the
        store's whole life (flush and drain empty it in place)."""
        return self._items

    def make_room(self, keep: bytes) -> None:
        """After a store took ``bytes_used`` over capacity: evict from the LRU end down to a
        little under capacity (1/64 of it, so that the next stores do not each pay for a
        scan), never ``keep`` (the key just stored)."""
        self._evict_to(self.capacity - (self.capacity >> 6), by_shrinker=False, keep=keep)

    # -- reading -------------------------------------------------------------------------------

    @property
    def curr_items(self) -> int:
        return len(self._items)

    def now(self) -> int:
        return int(self.clock())

    def __contains__(self, key: bytes) -> bool:
        return self._live(key, self.now()) is not None

    def get(self, key: bytes) -> bytes | None:
        """The live item for ``key``, or None. A hit marks the item fetched and moves it to
        the LRU's recent end, unless a hit did that less than ``BUMP_INTERVAL`` ago.

        cacheserver/fastpath/store.c does the same for its gets: change both together.
        """
        # The hot path: written out rather than built from _live() to save calls per hit.
        if self.flush_at:
            self._apply_pending_flush(self.now())
        items = self._items
        item = items.get(key)
        if item is None:
            return None
        now = self.clock()
        exptime = _U32_AT(item, 8)[0]
        if exptime and exptime <= now:
            self._drop_expired(key, item)
            self.stats.get_expired += 1
            return None
        now = int(now)
        if item[META_AT] & FETCHED and now - _U32_AT(item, BUMPED_AT)[0] < BUMP_INTERVAL:
            return item
        del items[key]
        item = as_bumped(item, now)
        items[key] = item
        return item

    def lru_items(self) -> list[tuple[bytes, bytes]]:
        """Every item (expired ones not yet reclaimed too), least recently used first."""
        self._apply_pending_flush(self.now())
        return list(self._items.items())

    def peek(self, key: bytes) -> bytes | None:
        """The live item for ``key`` without counting a hit (memcached's DONT_UPDATE)."""
        return self._live(key, self.now())

    def amend(
        self,
        key: bytes,
        item: bytes,
        *,
        exptime: int | None = None,
        marks: int | None = None,
        cas: int | None = None,
        hit: bool = False,
    ) -> bytes:
        """Rewrite the header of ``item``, the live item of ``key`` (its value unchanged), and
        with ``hit`` count a hit as ``get`` does: mark it fetched and move it to the LRU's
        recent end at most once per ``BUMP_INTERVAL``. Returns the new item."""
        old_cas, old_exptime, flags, bumped, meta, old_marks = unpack_header(item)
        moved = False
        if hit:
            now = self.now()
            if not (meta & FETCHED and now - bumped < BUMP_INTERVAL):
                bumped = now
                moved = True
            meta |= FETCHED
        new = (
            pack_header(
                old_cas if cas is None else cas,
                old_exptime if exptime is None else exptime,
                flags,
                bumped,
                meta,
                old_marks if marks is None else marks,
            )
            + item[HEADER_SIZE:]
        )
        items = self._items
        if moved:
            del items[key]
        items[key] = new
        return new

    def next_cas(self) -> int:
        """A new CAS value (an item changed in place takes one, as in memcached)."""
        return self._next_cas()

    def touch(self, key: bytes, exptime: int) -> bytes | None:
        """Give a live item a new absolute expiry; returns the updated item or None."""
        item = self._live(key, self.now())
        if item is None:
            return None
        cas = unpack_header(item)[0]
        new = with_fetched(with_header(item, cas, exptime))
        self._replace(key, item, new)
        return new

    # -- writing -------------------------------------------------------------------------------

    def too_large(self, key: bytes, flags: int, nbytes: int) -> bool:
        """Whether memcached with the same -I would refuse this item as too large."""
        total = MEMCACHED_ITEM_OVERHEAD + len(key) + (4 if flags else 0) + nbytes + 2
        return total > self.max_item_size

    def set(self, key: bytes, flags: int, exptime: int, data: bytes, marks: int = 0) -> Outcome:
        if self.too_large(key, flags, len(data)):
            self.delete(key)  # as memcached: a failed set must not leave the stale value
            return Outcome.TOO_LARGE
        self.last_cas += 1
        item = make_item(self.last_cas, exptime, flags, data, now=self.now(), marks=marks)
        return self._store(key, item)

    def add(self, key: bytes, flags: int, exptime: int, data: bytes, marks: int = 0) -> Outcome:
        if self.too_large(key, flags, len(data)):
            return Outcome.TOO_LARGE
        now = self.now()
        if self._live(key, now) is not None:
            return Outcome.NOT_STORED
        item = make_item(self._next_cas(), exptime, flags, data, now=now, marks=marks)
        return self._store(key, item)

    def replace(self, key: bytes, flags: int, exptime: int, data: bytes, marks: int = 0) -> Outcome:
        if self.too_large(key, flags, len(data)):
            return Outcome.TOO_LARGE
        now = self.now()
        if self._live(key, now) is None:
            return Outcome.NOT_STORED
        item = make_item(self._next_cas(), exptime, flags, data, now=now, marks=marks)
        return self._store(key, item)

    def cas(
        self,
        key: bytes,
        flags: int,
        exptime: int,
        data: bytes,
        unique: int,
        marks: int = 0,
        stale: bool = False,
    ) -> Outcome:
        """Store if the item's CAS is ``unique``. With ``stale`` (the meta protocol's
        invalidation), an older ``unique`` than the item's also stores, as memcached does:
        the value is marked stale and keeps the item's expiry and recache token."""
        if self.too_large(key, flags, len(data)):
            return Outcome.TOO_LARGE
        now = self.now()
        old = self._live(key, now)
        if old is None:
            return Outcome.NOT_FOUND
        old_cas, old_exptime, _, _, _, old_marks = unpack_header(old)
        if old_cas != unique:
            if not (stale and 0 < unique < old_cas):
                return Outcome.EXISTS
            exptime = old_exptime
            marks |= STALE | (old_marks & TOKEN_SENT)
        item = make_item(self._next_cas(), exptime, flags, data, now=now, marks=marks)
        return self._store(key, item)

    def append(self, key: bytes, data: bytes, unique: int = 0) -> Outcome:
        return self._concat(key, data, True, unique)

    def prepend(self, key: bytes, data: bytes, unique: int = 0) -> Outcome:
        return self._concat(key, data, False, unique)

    def _concat(self, key: bytes, data: bytes, at_end: bool, unique: int) -> Outcome:
        """append/prepend; a non-zero ``unique`` must match the item's CAS (else EXISTS)."""
        now = self.now()
        old = self._live(key, now)
        if old is None:
            return Outcome.NOT_STORED
        old_cas, exptime, flags, _, _, _ = unpack_header(old)
        if unique and unique != old_cas:
            return Outcome.EXISTS
        old_data = item_data(old)
        new_data = old_data + data if at_end else data + old_data
        if self.too_large(key, flags, len(new_data)):
            return Outcome.TOO_LARGE
        # As memcached: the result is a new item (not yet fetched, no meta marks).
        new = make_item(self._next_cas(), exptime, flags, new_data, now=now)
        return self._store(key, new)

    def delete(self, key: bytes) -> bool:
        item = self._live(key, self.now())
        if item is None:
            return False
        self._unlink(key, item)
        return True

    def incr(self, key: bytes, delta: int, unique: int = 0) -> int | Outcome:
        return self.arith(key, delta, True, unique)

    def decr(self, key: bytes, delta: int, unique: int = 0) -> int | Outcome:
        return self.arith(key, delta, False, unique)

    def arith(self, key: bytes, delta: int, incr: bool, unique: int = 0) -> int | Outcome:
        """incr/decr: the new value, or NOT_FOUND, NON_NUMERIC, or EXISTS when a non-zero
        ``unique`` does not match the item's CAS (checked in memcached's order)."""
        now = self.now()
        old = self._live(key, now)
        if old is None:
            return Outcome.NOT_FOUND
        data = item_data(old)
        old_cas, exptime, flags, _, _, marks = unpack_header(old)
        if not data:
            return Outcome.NON_NUMERIC
        if unique and unique != old_cas:
            return Outcome.EXISTS
        current = parse_stored_number(data)
        if current is None:
            return Outcome.NON_NUMERIC
        value = (current + delta) & MAX_U64 if incr else max(current - delta, 0)
        digits = b"%d" % value
        if len(digits) <= len(data):
            # memcached rewrites a number that fits in place, padding with spaces to the old
            # length: the item keeps its fetched bit and marks.
            new = make_item(
                self._next_cas(),
                exptime,
                flags,
                digits.ljust(len(data)),
                item_fetched(old),
                now=now,
                marks=marks,
            )
        else:  # a longer number makes a new item
            new = make_item(self._next_cas(), exptime, flags, digits, now=now)
        self._store(key, new)
        return value

    def flush(self, at: int = 0) -> None:
        """flush_all: drop every item now, or every item that exists at time ``at``."""
        if at and at > self.now():
            self.flush_at = at
            return
        self.flush_at = 0
        self._items.clear()
        self.bytes_used = 0
        self._crawl_keys = []

    # -- capacity and memory -------------------------------------------------------------------

    def set_capacity(self, nbytes: int) -> None:
        """Change the byte capacity; lowering it evicts LRU items down to it."""
        self.capacity = max(nbytes, 0)
        if self.bytes_used > self.capacity:
            self._evict_to(self.capacity, by_shrinker=False)

    def shrink(self, target_bytes: int) -> int:
        """Evict LRU items until at most ``target_bytes`` are used; returns bytes released."""
        released = self._evict_to(max(target_bytes, 0), by_shrinker=True)
        self.stats.bytes_released_shrinker += released
        return released

    def reclaim_expired(self, budget: int = 10_000) -> int:
        """One step of the background crawler: check up to ``budget`` keys for expiry.

        A crawl walks a snapshot of the keys in steps, so a large cache never stalls the
        worker's event loop; keys changed since the snapshot are looked up afresh.
        """
        self._apply_pending_flush(self.now())
        if not self._crawl_keys:
            if not self._items:
                return 0
            self._crawl_keys = list(self._items)
        keys = self._crawl_keys
        step = keys[-budget:]
        del keys[-budget:]
        now = self.now()
        reclaimed = 0
        items = self._items
        for key in step:
            item = items.get(key)
            if item is not None and _expired(item, now):
                self._drop_expired(key, item)
                reclaimed += 1
        self.stats.crawler_items_checked += len(step)
        return reclaimed

    # -- warm restart (storage/snapshot.py has the format) ----------------------------------

    def drain(self) -> tuple[list[bytes], list[bytes]]:
        """Take every key and item out, least recently used first; the store is left empty.

        For a snapshot at shutdown: once the caller drops an item, its memory can go back.
        """
        items = self._items
        keys, values = list(items), list(items.values())
        items.clear()  # the same dict: the fast path holds it
        self.bytes_used = 0
        self._crawl_keys = []
        return keys, values

    def restore_state(self, cas: int, flush_at: int) -> None:
        """The CAS counter and pending flush of a snapshot: new CAS values stay unique."""
        self.last_cas = max(self.last_cas, cas)
        self.flush_at = flush_at

    def restore_items(self, keys: list[bytes], items: list[bytes], nbytes: int) -> None:
        """Add restored items (``nbytes``: keys and items together) at the LRU's recent end,
        in the order given. Capacity is not enforced here: call ``set_capacity`` after."""
        self._items.update(zip(keys, items, strict=True))
        self.bytes_used += nbytes + len(keys) * ITEM_OVERHEAD

    def restore_with(self, fill: Callable[[dict[bytes, bytes]], _Filled]) -> _Filled:
        """As ``restore_items``, with ``fill`` adding the items to the store's dict itself
        (the compiled snapshot reader: no lists in between); what it returns says how many
        it added (``count``) and their bytes (``nbytes``, keys and items together). If it
        fails halfway, ``flush``."""
        filled = fill(self._items)
        self.bytes_used += filled.nbytes + filled.count * ITEM_OVERHEAD
        return filled

    # -- internals -----------------------------------------------------------------------------

    def _next_cas(self) -> int:
        self.last_cas += 1
        return self.last_cas

    def _live(self, key: bytes, now: int) -> bytes | None:
        if self.flush_at:
            self._apply_pending_flush(now)
        item = self._items.get(key)
        if item is None:
            return None
        if _expired(item, now):
            self._drop_expired(key, item)
            self.stats.get_expired += 1
            return None
        return item

    def _apply_pending_flush(self, now: int) -> None:
        if self.flush_at and now >= self.flush_at:
            self.flush()

    def _drop_expired(self, key: bytes, item: bytes) -> None:
        self._unlink(key, item)
        self.stats.reclaimed += 1
        if not item_fetched(item):
            self.stats.expired_unfetched += 1

    def _unlink(self, key: bytes, item: bytes) -> None:
        del self._items[key]
        self.bytes_used -= item_cost(key, item)

    def _replace(self, key: bytes, old: bytes, new: bytes) -> None:
        items = self._items
        del items[key]
        items[key] = new
        self.bytes_used += item_cost(key, new) - item_cost(key, old)

    def _store(self, key: bytes, item: bytes) -> Outcome:
        cost = len(key) + len(item) + ITEM_OVERHEAD
        if cost > self.capacity:
            return Outcome.NO_MEMORY
        items = self._items
        old = items.pop(key, None)
        if old is not None:
            cost -= len(key) + len(old) + ITEM_OVERHEAD
        items[key] = item
        self.bytes_used += cost
        self.stats.total_items += 1
        if self.bytes_used > self.capacity:
            self.make_room(key)
        return Outcome.STORED

    def _evict_to(self, target: int, by_shrinker: bool, keep: bytes | None = None) -> int:
        items = self._items
        now = self.now()
        excess = self.bytes_used - target
        victims: list[bytes] = []
        for key, item in items.items():
            if excess <= 0:
                break
            if key == keep:
                continue
            victims.append(key)
            excess -= item_cost(key, item)
        released = 0
        stats = self.stats
        for key in victims:
            item = items.pop(key)
            cost = item_cost(key, item)
            self.bytes_used -= cost
            released += cost
            if _expired(item, now):
                stats.reclaimed += 1
                if not item_fetched(item):
                    stats.expired_unfetched += 1
                continue
            if by_shrinker:
                stats.evictions_shrinker += 1
            else:
                stats.evictions += 1
            if not item_fetched(item):
                stats.evicted_unfetched += 1
        return released


_U32_AT = struct.Struct("<I").unpack_from


def _expired(item: bytes, now: int) -> bool:
    exptime = _U32_AT(item, 8)[0]
    return exptime != NEVER and exptime <= now


def parse_stored_number(data: bytes) -> int | None:
    """A stored value as incr/decr reads it (memcached's strtoull rules), or None."""
    text = data.lstrip(b" \t\n\v\f\r")
    end = 0
    while end < len(text) and 48 <= text[end] <= 57:
        end += 1
    if end == 0 or (end < len(text) and text[end] not in b" \t\n\v\f\r"):
        # A leading '+' is accepted by strtoull as well.
        if text[:1] == b"+" and end == 0:
            return parse_stored_number(text[1:]) if text[1:2].isdigit() else None
        return None
    value = int(text[:end])
    return value if value <= MAX_U64 else None
