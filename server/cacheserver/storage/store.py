"""The item store: a byte-capacity cache with LRU eviction, lazy and background expiry, CAS.

``Store`` is a subclass of the compiled store core (``storage/_core.c``, its contract in
``storage/core.h``), which owns the items, the LRU, the accounting, expiry and eviction --
the one definition of them, which the compiled fast path calls directly. What the core gives
this class: ``get``, ``peek``, ``flush``, ``drain``, ``reclaim_expired``, ``make_room``,
``next_cas``, ``too_large``, ``now``, ``table``, ``curr_items``, ``capacity``,
``max_item_size``, ``bytes_used``, ``last_cas``, ``flush_at``, ``clock``, ``stats``, and the
primitives below (``_live``, ``_hit``, ``_store``, ``_replace``, ``_rewrite``, ``_unlink``,
``_evict_to``, ``_restored``). The commands built on them (add, replace, cas, append,
prepend, incr, decr, touch, the meta protocol's amend) are written here, once.

One ``Store`` belongs to one worker (shard-per-core), so nothing here takes a lock.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum, auto
from typing import Protocol, TypeVar

from cacheserver.storage import _core
from cacheserver.storage.item import (
    HEADER_SIZE,
    STALE,
    TOKEN_SENT,
    item_data,
    item_fetched,
    make_item,
    pack_header,
    unpack_header,
    with_fetched,
    with_header,
)

MAX_U64 = (1 << 64) - 1
BUMP_INTERVAL = _core.BUMP_INTERVAL  # seconds; memcached's ITEM_UPDATE_INTERVAL
# memcached's item header (48) + CAS (8) + the key's NUL: used to apply -I the way it does.
MEMCACHED_ITEM_OVERHEAD = _core.MEMCACHED_ITEM_OVERHEAD
# The store's counters: plain ints, read by stats and the metrics collector.
StoreStats = _core.StoreStats


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


class Store(_core.Core):
    """Store(capacity, max_item_size=1 MiB, clock=time.time)."""

    # -- reading (get, peek and the rest are the core's) ---------------------------------------

    def __contains__(self, key: bytes) -> bool:
        return self._live(key, self.now()) is not None

    def lru_items(self) -> list[tuple[bytes, bytes]]:
        """Every item (expired ones not yet reclaimed too), least recently used first."""
        self._apply_pending_flush()
        return list(self.table.items())

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
        with ``hit`` count a hit as ``get`` does. Returns the new item."""
        old_cas, old_exptime, flags, bumped, meta, old_marks = unpack_header(item)
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
        self._rewrite(key, new)
        return self._hit(key, new) if hit else new

    def touch(self, key: bytes, exptime: int) -> bytes | None:
        """Give a live item a new absolute expiry; returns the updated item or None."""
        item = self._live(key, self.now())
        if item is None:
            return None
        cas = unpack_header(item)[0]
        new = with_fetched(with_header(item, cas, exptime))
        self._replace(key, new)
        return new

    # -- writing -------------------------------------------------------------------------------

    def set(self, key: bytes, flags: int, exptime: int, data: bytes, marks: int = 0) -> Outcome:
        if self.too_large(key, flags, len(data)):
            self.delete(key)  # as memcached: a failed set must not leave the stale value
            return Outcome.TOO_LARGE
        item = make_item(self.next_cas(), exptime, flags, data, now=self.now(), marks=marks)
        return self._stored(key, item)

    def add(self, key: bytes, flags: int, exptime: int, data: bytes, marks: int = 0) -> Outcome:
        if self.too_large(key, flags, len(data)):
            return Outcome.TOO_LARGE
        now = self.now()
        if self._live(key, now) is not None:
            return Outcome.NOT_STORED
        item = make_item(self.next_cas(), exptime, flags, data, now=now, marks=marks)
        return self._stored(key, item)

    def replace(self, key: bytes, flags: int, exptime: int, data: bytes, marks: int = 0) -> Outcome:
        if self.too_large(key, flags, len(data)):
            return Outcome.TOO_LARGE
        now = self.now()
        if self._live(key, now) is None:
            return Outcome.NOT_STORED
        item = make_item(self.next_cas(), exptime, flags, data, now=now, marks=marks)
        return self._stored(key, item)

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
        item = make_item(self.next_cas(), exptime, flags, data, now=now, marks=marks)
        return self._stored(key, item)

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
        new = make_item(self.next_cas(), exptime, flags, new_data, now=now)
        return self._stored(key, new)

    def delete(self, key: bytes) -> bool:
        return self._live(key, self.now()) is not None and self._unlink(key)

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
                self.next_cas(),
                exptime,
                flags,
                digits.ljust(len(data)),
                item_fetched(old),
                now=now,
                marks=marks,
            )
        else:  # a longer number makes a new item
            new = make_item(self.next_cas(), exptime, flags, digits, now=now)
        self._stored(key, new)
        return value

    # -- capacity and memory -------------------------------------------------------------------

    def set_capacity(self, nbytes: int) -> None:
        """Change the byte capacity; lowering it evicts LRU items down to it."""
        self.capacity = max(nbytes, 0)
        if self.bytes_used > self.capacity:
            self._evict_to(self.capacity, False)

    def shrink(self, target_bytes: int) -> int:
        """Evict LRU items until at most ``target_bytes`` are used; returns bytes released."""
        released = self._evict_to(max(target_bytes, 0), True)
        self.stats.bytes_released_shrinker += released
        return released

    # -- warm restart (storage/snapshot.py has the format) ----------------------------------

    def restore_state(self, cas: int, flush_at: int) -> None:
        """The CAS counter and pending flush of a snapshot: new CAS values stay unique."""
        self.last_cas = max(self.last_cas, cas)
        self.flush_at = flush_at

    def restore_items(self, keys: list[bytes], items: list[bytes], nbytes: int) -> None:
        """Add restored items (``nbytes``: keys and items together) at the LRU's recent end,
        in the order given. Capacity is not enforced here: call ``set_capacity`` after."""
        self.table.update(zip(keys, items, strict=True))
        self._restored(len(keys), nbytes)

    def restore_with(self, fill: Callable[[dict[bytes, bytes]], _Filled]) -> _Filled:
        """As ``restore_items``, with ``fill`` adding the items to the store's dict itself
        (the compiled snapshot reader: no lists in between); what it returns says how many
        it added (``count``) and their bytes (``nbytes``, keys and items together). If it
        fails halfway, ``flush``."""
        filled = fill(self.table)
        self._restored(filled.count, filled.nbytes)
        return filled

    # -- internals -----------------------------------------------------------------------------

    def _stored(self, key: bytes, item: bytes) -> Outcome:
        return Outcome.STORED if self._store(key, item) else Outcome.NO_MEMORY


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
