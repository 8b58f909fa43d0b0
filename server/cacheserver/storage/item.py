"""The compact item representation.

An item is one immutable ``bytes`` object, so a stored key costs exactly two Python objects
(the key and the item) plus its dict slot. That keeps memory per item close to memcached's
(see docs/benchmarks.md). Layout::

    cas:u64 | exptime:u32 | flags:u32 | bumped:u32 | meta:u8 | marks:u8
    | b" <flags> <nbytes>\\r\\n" | data | b"\\r\\n"

``bumped`` is when the item was stored or a hit last moved it to the LRU's recent end
(memcached's "last access" time, which the meta protocol reports). ``meta`` holds the offset
of ``data`` in its low 7 bits and the "fetched" bit on top (for the evicted_unfetched /
expired_unfetched counters). ``marks`` are the meta protocol's per-item bits: the key came
base64-encoded, the item was invalidated (stale), a client was already told to recache it.
The pre-formatted suffix lets a get hit be answered with one slice:
``b"VALUE " + key + item[HEADER_SIZE:]``.
"""

from __future__ import annotations

import struct

HEADER_FORMAT = "<QIIIBB"
_HEADER = struct.Struct(HEADER_FORMAT)
HEADER_SIZE = _HEADER.size  # 22
EXPTIME_AT = 8
FLAGS_AT = 12
BUMPED_AT = 16
META_AT = 20
MARKS_AT = 21
FETCHED = 0x80
# The marks (memcached's ITEM_KEY_BINARY, ITEM_STALE and ITEM_TOKEN_SENT).
KEY_BINARY = 0x01
STALE = 0x02
TOKEN_SENT = 0x04
OFFSET_MASK = 0x7F  # meta: the offset of the data
NEVER = 0  # exptime meaning "does not expire"

pack_header = _HEADER.pack
unpack_header = _HEADER.unpack_from


def make_item(
    cas: int,
    exptime: int,
    flags: int,
    data: bytes,
    fetched: bool = False,
    now: int = 0,
    marks: int = 0,
) -> bytes:
    """Build an item stored at ``now``; ``data`` is the value without its trailing CRLF."""
    suffix = b" %d %d\r\n" % (flags, len(data))
    meta = (HEADER_SIZE + len(suffix)) | (FETCHED if fetched else 0)
    header = _HEADER.pack(cas, exptime, flags, now, meta, marks)
    return b"".join((header, suffix, data, b"\r\n"))


def item_cas(item: bytes) -> int:
    return _HEADER.unpack_from(item)[0]


def item_exptime(item: bytes) -> int:
    return _HEADER.unpack_from(item)[1]


def item_flags(item: bytes) -> int:
    return _HEADER.unpack_from(item)[2]


def item_data(item: bytes) -> bytes:
    """The value without its trailing CRLF."""
    return item[item[META_AT] & OFFSET_MASK : -2]


def item_nbytes(item: bytes) -> int:
    return len(item) - (item[META_AT] & OFFSET_MASK) - 2


def item_fetched(item: bytes) -> bool:
    return bool(item[META_AT] & FETCHED)


_BUMPED = struct.Struct("<I")


def item_bumped(item: bytes) -> int:
    return _BUMPED.unpack_from(item, BUMPED_AT)[0]


def item_marks(item: bytes) -> int:
    return item[MARKS_AT]


def with_fetched(item: bytes) -> bytes:
    """A copy with the fetched bit set."""
    return b"".join((item[:META_AT], bytes((item[META_AT] | FETCHED,)), item[MARKS_AT:]))


def as_bumped(item: bytes, now: int) -> bytes:
    """A copy marked fetched and moved to the LRU's recent end at ``now``."""
    return b"".join(
        (
            item[:BUMPED_AT],
            _BUMPED.pack(now),
            bytes((item[META_AT] | FETCHED,)),
            item[MARKS_AT:],
        )
    )


def with_header(
    item: bytes, cas: int, exptime: int, marks: int | None = None, bumped: int | None = None
) -> bytes:
    """A copy with a new CAS and exptime (and marks, last access), the value and flags
    unchanged."""
    _, _, flags, old_bumped, meta, old_marks = _HEADER.unpack_from(item)
    return (
        _HEADER.pack(
            cas,
            exptime,
            flags,
            old_bumped if bumped is None else bumped,
            meta,
            old_marks if marks is None else marks,
        )
        + item[HEADER_SIZE:]
    )


def value_response(key: bytes, item: bytes) -> bytes:
    """The ``VALUE`` block of a get for this item, terminating CRLF included."""
    return b"VALUE " + key + item[HEADER_SIZE:]


def value_response_with_cas(key: bytes, item: bytes) -> bytes:
    """The ``VALUE`` block of a gets: the CAS goes at the end of the header line."""
    cas = _HEADER.unpack_from(item)[0]
    off = item[META_AT] & OFFSET_MASK
    return b"".join((b"VALUE ", key, item[HEADER_SIZE : off - 2], b" %d\r\n" % cas, item[off:]))


# Two bytes objects' headers (33 each), their average allocator rounding (8 each) and one
# dict slot (hash, key and value pointers, index share) at the dict's usual fill.
ITEM_OVERHEAD = 33 * 2 + 8 * 2 + 48


def item_cost(key: bytes, item: bytes) -> int:
    """Memory accounted to a stored item: both objects as allocated, plus its dict slot."""
    return len(key) + len(item) + ITEM_OVERHEAD
