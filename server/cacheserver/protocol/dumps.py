"""Key dumps: ``stats cachedump <class> <limit>`` and ``lru_crawler metadump``, in memcached
1.6.18's formats. Pure functions of the store's items; no I/O.

memcached walks its per-class LRU lists; this server has one LRU, so items are grouped by
the slab class memcached would have put them in (protocol/slabs.py). ``metadump`` visits
the classes in turn, one item of each per round and the least recently used first, as
memcached's crawler does; ``cachedump`` lists one class, most recently used first.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from cacheserver.protocol.slabs import SlabClasses, item_total
from cacheserver.storage.item import FETCHED, KEY_BINARY, MARKS_AT, item_nbytes, unpack_header

CACHEDUMP_LIMIT = 2 * 1024 * 1024  # memcached stops a cachedump reply at 2 MB
MAX_CLASS_ID = 63  # memcached's MAX_NUMBER_OF_SLAB_CLASSES - 1

_URI_SAFE = frozenset((string.ascii_letters + string.digits + "-._~").encode())


def uri_encode(key: bytes) -> bytes:
    """memcached's uriencode: anything but letters, digits and ``-._~`` as %XX."""
    return b"".join(bytes((c,)) if c in _URI_SAFE else b"%%%02X" % c for c in key)


def _by_class(
    items: Iterable[tuple[bytes, bytes]], slabs: SlabClasses
) -> dict[int, list[tuple[bytes, bytes]]]:
    classes: dict[int, list[tuple[bytes, bytes]]] = {}
    for key, item in items:
        flags = unpack_header(item)[2]
        clsid = slabs.class_of_item(len(key), item_nbytes(item), flags)
        classes.setdefault(clsid, []).append((key, item))
    return classes


def cachedump(
    items: Iterable[tuple[bytes, bytes]], slabs: SlabClasses, clsid: int, limit: int
) -> bytes:
    """``stats cachedump``: ``ITEM <key> [<bytes> b; <expiry> s]`` for up to ``limit`` items
    (0: all) of one class; keys stored base64-encoded are left out, as memcached does."""
    chosen = _by_class(items, slabs).get(clsid, [])
    lines: list[bytes] = []
    size = 0
    for key, item in reversed(chosen):
        if limit and len(lines) >= limit:
            break
        if item[MARKS_AT] & KEY_BINARY:
            continue
        exptime = unpack_header(item)[1]
        line = b"ITEM %s [%d b; %d s]\r\n" % (key, item_nbytes(item), exptime)
        if size + len(line) + 6 > CACHEDUMP_LIMIT:
            break
        lines.append(line)
        size += len(line)
    lines.append(b"END\r\n")
    return b"".join(lines)


def parse_classes(spec: bytes) -> set[int] | None:
    """``all``, ``hash`` or a comma-separated list of class ids: the classes to dump (None:
    every class), or ``set()`` meaning "a bad class id"."""
    if spec in (b"all", b"hash"):
        return None
    wanted: set[int] = set()
    for part in spec.split(b","):
        if not part:
            continue
        if not part.isdigit() or not 1 <= int(part) <= MAX_CLASS_ID:
            return set()
        wanted.add(int(part))
    return wanted


def metadump(
    items: Iterable[tuple[bytes, bytes]], slabs: SlabClasses, classes: set[int] | None, now: int
) -> bytes:
    """``lru_crawler metadump``: one line per live item (``\\n``-terminated), then ``END``."""
    grouped = _by_class(items, slabs)
    queues = [grouped[c] for c in sorted(grouped) if classes is None or c in classes]
    lines: list[bytes] = []
    for round_ in range(max((len(q) for q in queues), default=0)):
        for queue in queues:
            if round_ >= len(queue):
                continue
            key, item = queue[round_]
            cas, exptime, flags, bumped, meta, _ = unpack_header(item)
            if exptime and exptime < now:
                continue  # expired, not reclaimed yet: left out
            nbytes = item_nbytes(item)
            lines.append(
                b"key=%s exp=%d la=%d cas=%d fetch=%s cls=%d size=%d\n"
                % (
                    uri_encode(key),
                    exptime if exptime else -1,
                    bumped,
                    cas,
                    b"yes" if meta & FETCHED else b"no",
                    slabs.class_of_item(len(key), nbytes, flags),
                    item_total(len(key), nbytes, flags),
                )
            )
    lines.append(b"END\r\n")
    return b"".join(lines)
