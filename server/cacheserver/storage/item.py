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

The store core (``storage/core.h``, compiled) defines the layout and builds new items
(``make_item``); this module gives its numbers to the Python layers, which read items and
rewrite their headers.
"""

from __future__ import annotations

import struct

from cacheserver.storage import _core

# The layout is the store core's (storage/core.h): every offset and size below is its.
HEADER_SIZE = _core.HEADER_SIZE  # 22
EXPTIME_AT = _core.EXPTIME_AT
FLAGS_AT = _core.FLAGS_AT
BUMPED_AT = _core.BUMPED_AT
META_AT = _core.META_AT
MARKS_AT = _core.MARKS_AT
FETCHED = _core.FETCHED
OFFSET_MASK = _core.OFFSET_MASK  # meta: the offset of the data
# Memory accounted to a stored item besides its key and item bytes: both objects' headers,
# their allocator rounding and one dict slot (core.h).
ITEM_OVERHEAD = _core.ITEM_OVERHEAD
# The marks (memcached's ITEM_KEY_BINARY, ITEM_STALE and ITEM_TOKEN_SENT): the meta
# protocol's, which the core stores and never reads.
KEY_BINARY = 0x01
STALE = 0x02
TOKEN_SENT = 0x04
NEVER = 0  # exptime meaning "does not expire"

# The header as Python reads and rewrites it; checked against the core's offsets.
HEADER_FORMAT = "<QIIIBB"


def check_layout(fmt: str) -> struct.Struct:
    """The header struct for ``fmt``, if its fields sit where the core puts them."""
    header = struct.Struct(fmt)
    offsets, at = [], 0
    for code in fmt[1:]:
        offsets.append(at)
        at += struct.calcsize("<" + code)
    expected = [0, EXPTIME_AT, FLAGS_AT, BUMPED_AT, META_AT, MARKS_AT, HEADER_SIZE]
    if fmt[0] != "<" or [*offsets, header.size] != expected:
        raise ImportError(
            f"storage/item.py: header format {fmt!r} does not match the store core's layout "
            "(storage/core.h)"
        )
    return header


_HEADER = check_layout(HEADER_FORMAT)
pack_header = _HEADER.pack
unpack_header = _HEADER.unpack_from

# make_item(cas, exptime, flags, data, fetched=False, now=0, marks=0): an item stored at
# ``now``; ``data`` is the value without its trailing CRLF.
make_item = _core.make_item


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


def item_cost(key: bytes, item: bytes) -> int:
    """Memory accounted to a stored item: both objects as allocated, plus its dict slot."""
    return len(key) + len(item) + ITEM_OVERHEAD
