"""The snapshot format of a warm restart: a store's items as bytes, and back. No file I/O.

Written as a stream of chunks (``write``), read back through ``read(offset, size)``::

    prefix   magic:8s | format:u32 | header length:u32 | header crc32:u32
    header   JSON: who wrote it (identity, item layout, server version) and the store's state
    block*   payload length:u64 | items:u32 | crc32:u32 | payload
    index    one u64 per block: where its block starts
    footer   index offset:u64 | blocks:u64 | items:u64 | crc32:u32 | end magic:8s

A block's payload is its items' key lengths (one byte each), their item lengths (u32 each),
the keys, then the items (``storage/item.py``'s bytes, unchanged: CAS, absolute exptime,
flags, fetched bit, meta marks). Whole arrays per block rather than a header per record: writing and
reading then run in C (``bytes.join``, ``map``, ``itertools.accumulate``) with one Python
step per block, not per item. With the compiled ``_snapshotio`` (storage/_snapshotio.c) a
block is written from the objects themselves (``pwritev``, no joined copy) and restored into
the store's dict in one C loop; the bytes on disk are the same either way, and this module
reads and writes them without it.

Blocks are written most-recently-used first, so the least-recently-used items sit at the
end of the file: a reader that restores from the last block to the first inserts items in
LRU order and can cut the file shorter behind it (giving its memory back on tmpfs) as it goes.

The crc32 of a block covers its length, count and payload; the footer's covers the index,
the counts and the header's crc. Anything that does not check out raises ``Refused`` with a
reason a metric can carry: a snapshot is used whole or not at all.
"""

from __future__ import annotations

import io
import json
import mmap
import struct
import sys
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from itertools import accumulate, repeat
from operator import itemgetter

from cacheserver.storage.item import (
    BUMPED_AT,
    EXPTIME_AT,
    FETCHED,
    HEADER_SIZE,
    ITEM_OVERHEAD,
    MARKS_AT,
    META_AT,
)

try:
    from cacheserver.storage import _snapshotio
except ImportError:  # not built (no compiler or no zlib.h): the Python path below
    _snapshotio = None  # type: ignore[assignment]
COMPILED = _snapshotio is not None

MAGIC = b"CSNAP\x00\r\n"
END_MAGIC = b"CSNAPEND"
FORMAT = 1
# What the items' bytes mean; a reader with another layout cannot use them.
LAYOUT = [HEADER_SIZE, BUMPED_AT, META_AT, MARKS_AT, FETCHED, ITEM_OVERHEAD]
BLOCK_BYTES = 16 << 20  # keys and items per block, about

_PREFIX = struct.Struct("<8sIII")
_BLOCK = struct.Struct("<QII")
_BLOCK_CRC = struct.Struct("<QI")
_FOOTER = struct.Struct("<QQQI8s")
_FOOTER_CRC = struct.Struct("<QQQI")
MIN_SIZE = _PREFIX.size + _FOOTER.size  # no file shorter than this is a snapshot
MIN_ITEM = HEADER_SIZE + 6  # no item is shorter: its header and b" 0 0\r\n"
_LITTLE = sys.byteorder == "little"
_EXPTIME_BYTES = itemgetter(slice(8, 12))

Buffer = bytes | mmap.mmap
Stream = io.BytesIO | mmap.mmap


class Refused(Exception):
    """A snapshot that must not be used. ``reason`` is one word for a metric label:
    truncated, corrupt, version, settings or memory."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Identity:
    """What the reader must share with the writer, beyond the format and item layout."""

    budget: str  # the memory budget, e.g. "-m 64" or "auto: limit 1073741824, headroom ..."
    max_item_size: int
    worker: int
    workers: int


@dataclass
class Header:
    identity: Identity
    version: str  # the server that wrote it (logged; not compared)
    saved_at: float
    cas: int  # the store's CAS counter
    flush_at: int  # a pending delayed flush_all (absolute time), 0 when none
    started: float  # when the writer's process started (memcached keeps its uptime)
    items: int
    layout: list[int]


def write_snapshot(
    keys: list[bytes],
    vals: list[bytes],
    header: Header,
    write: Callable[[bytes], object],
    *,
    release: bool = False,
    block_bytes: int = BLOCK_BYTES,
    append_block: Callable[[list[bytes], list[bytes], int, int], int] | None = None,
) -> int:
    """Write items (keys and items in LRU order, least recent first). Returns bytes written.

    With ``release`` the lists' entries are set to None once their block is written, so the
    items' memory can be given back while the snapshot grows (the caller drops every other
    reference, e.g. by clearing the store's dict, before calling).

    ``append_block(keys, vals, start, stop)``, when given, writes the block of those items
    (header and payload, right after what ``write`` wrote so far) and returns its size: the
    file writer's compiled path (``block_writer``).
    """
    n = len(keys)
    if len(vals) != n or header.items != n:
        raise ValueError("keys, items and the header's count must agree")
    head = json.dumps(asdict(header), separators=(",", ":")).encode()
    head_crc = zlib.crc32(head)
    first = _PREFIX.pack(MAGIC, FORMAT, len(head), head_crc) + head
    write(first)
    offset = len(first)
    klens = bytes(map(len, keys)) if append_block is None else b""
    ilens = array("I", map(len, vals))
    # Block boundaries: cut the cumulative size of the items every block_bytes.
    ends = list(accumulate(ilens))
    bounds: list[tuple[int, int]] = []
    start = 0
    while start < n:
        base = ends[start - 1] if start else 0
        stop = max(bisect_right(ends, base + block_bytes, start), start + 1)
        bounds.append((start, stop))
        start = stop
    index = array("Q")
    for a, b in reversed(bounds):
        index.append(offset)
        if append_block is not None:
            offset += append_block(keys, vals, a, b)
        else:
            lengths = ilens[a:b]
            if not _LITTLE:
                lengths.byteswap()
            parts: list[bytes] = [klens[a:b], lengths.tobytes()]
            parts += keys[a:b]
            parts += vals[a:b]
            payload = b"".join(parts)
            del parts
            crc = zlib.crc32(payload, zlib.crc32(_BLOCK_CRC.pack(len(payload), b - a)))
            write(_BLOCK.pack(len(payload), b - a, crc))
            write(payload)
            offset += _BLOCK.size + len(payload)
            del payload
        if release:
            keys[a:b] = repeat(None, b - a)  # type: ignore[list-item]
            vals[a:b] = repeat(None, b - a)  # type: ignore[list-item]
    if not _LITTLE:
        index.byteswap()
    index_bytes = index.tobytes()
    crc = zlib.crc32(_FOOTER_CRC.pack(offset, len(bounds), n, head_crc), zlib.crc32(index_bytes))
    tail = index_bytes + _FOOTER.pack(offset, len(bounds), n, crc, END_MAGIC)
    write(tail)
    return offset + len(tail)


@dataclass
class Opened:
    """A snapshot whose header and footer check out; its blocks are checked as they are read."""

    header: Header
    blocks: list[int]  # where each block starts, in file order (most recent items first)
    index_offset: int


def open_snapshot(data: Buffer) -> Opened:
    """Check the prefix, header, footer and index; raises Refused."""
    size = len(data)

    def read(offset: int, length: int) -> bytes:
        return data[offset : offset + length]

    if size < MIN_SIZE:
        raise Refused("truncated", f"{size} bytes is shorter than an empty snapshot")
    magic, fmt, head_len, head_crc = _PREFIX.unpack(read(0, _PREFIX.size))
    if magic != MAGIC:
        raise Refused("corrupt", "not a cacheserver snapshot (bad magic)")
    if fmt != FORMAT:
        raise Refused("version", f"snapshot format {fmt}, this server reads format {FORMAT}")
    if _PREFIX.size + head_len + _FOOTER.size > size:
        raise Refused("truncated", "the file ends inside the header")
    head = read(_PREFIX.size, head_len)
    if zlib.crc32(head) != head_crc:
        raise Refused("corrupt", "header checksum mismatch")
    try:
        fields = json.loads(head)
        fields["identity"] = Identity(**fields["identity"])
        header = Header(**fields)
    except (ValueError, TypeError, KeyError) as err:
        raise Refused("version", f"header not understood: {err}") from None
    if header.layout != LAYOUT:
        raise Refused(
            "version", f"item layout {header.layout}, this server stores items as {LAYOUT}"
        )
    index_offset, nblocks, items, crc, end = _FOOTER.unpack(read(size - _FOOTER.size, _FOOTER.size))
    if end != END_MAGIC:
        raise Refused("truncated", "no footer: the snapshot was not written to its end")
    if index_offset + 8 * nblocks + _FOOTER.size != size:
        raise Refused("corrupt", "the footer does not match the file's size")
    index_bytes = read(index_offset, 8 * nblocks)
    if crc != zlib.crc32(
        _FOOTER_CRC.pack(index_offset, nblocks, items, head_crc), zlib.crc32(index_bytes)
    ):
        raise Refused("corrupt", "footer checksum mismatch")
    if items != header.items:
        raise Refused("corrupt", f"footer counts {items} items, header {header.items}")
    index = array("Q")
    index.frombytes(index_bytes)
    if not _LITTLE:
        index.byteswap()
    blocks = index.tolist()
    first = _PREFIX.size + head_len
    if blocks and (blocks[0] != first or blocks != sorted(blocks) or blocks[-1] >= index_offset):
        raise Refused("corrupt", "the block index points outside the blocks")
    if not blocks and index_offset != first:
        raise Refused("corrupt", "the block index is empty but the file is not")
    return Opened(header, blocks, index_offset)


def check_identity(header: Header, expected: Identity) -> None:
    """Raises Refused when the snapshot was written under other settings or memory budget."""
    theirs = header.identity
    if theirs.budget != expected.budget:
        raise Refused(
            "memory",
            f"written with memory budget {theirs.budget}, this server has {expected.budget}",
        )
    for name in ("max_item_size", "workers", "worker"):
        was, now = getattr(theirs, name), getattr(expected, name)
        if was != now:
            raise Refused("settings", f"written with {name} {was}, this server has {now}")


@dataclass
class Block:
    keys: list[bytes]  # (empty when fill_block put them in a store already)
    items: list[bytes]
    nbytes: int  # keys and items together
    expired: int  # items dropped because their exptime has passed
    offset: int  # where the block started in the file
    count: int  # items kept


@dataclass(frozen=True)
class Span:
    """A block whose checksum and lengths checked out: where it and its payload are."""

    offset: int  # where the block starts in the file
    at: int  # where its payload starts
    size: int  # of the payload
    count: int  # items


def checked_blocks(data: Buffer, opened: Opened) -> Iterator[Span]:
    """The blocks from the least recently used items to the most (the file's last block
    first), each checked when it comes: its checksum, and that its lengths add up. Raises
    Refused."""
    starts = opened.blocks
    ends = [*starts[1:], opened.index_offset] if starts else []
    with memoryview(data) as view:
        for start, end in zip(reversed(starts), reversed(ends), strict=True):
            try:
                span = _check_block(view, start, end)
            except (struct.error, ValueError, OverflowError) as err:
                raise Refused("corrupt", f"block at {start}: {err}") from None
            yield span


def read_blocks(data: Buffer, opened: Opened, now: int) -> Iterator[Block]:
    """The checked blocks' items, from the least recently used to the most; items already
    expired at ``now`` are left out. Raises Refused.

    ``data``: the snapshot as ``bytes`` or an ``mmap`` (whose own ``read`` then copies each
    key and item straight out of the file's pages)."""
    for span in checked_blocks(data, opened):
        yield decode_block(data, span, now)


def decode_block(data: Buffer, span: Span, now: int) -> Block:
    """A checked block's live items, as lists."""
    stream = data if isinstance(data, mmap.mmap) else io.BytesIO(data)
    return _read_block(stream, span, now)


def fill_block(items: dict[bytes, bytes], data: Buffer, span: Span, now: int) -> Block:
    """The compiled path (when ``COMPILED``): add a checked block's live items to ``items``
    (a store's dict) in order, and return what was added (with no keys and items lists).
    Raises Refused."""
    assert _snapshotio is not None, "fill_block without the compiled path"
    with memoryview(data) as view, view[span.at : span.at + span.size] as payload:
        try:
            stored, nbytes, expired = _snapshotio.fill(
                items, payload, span.count, now, EXPTIME_AT, MIN_ITEM
            )
        except ValueError as err:
            raise Refused("corrupt", f"block at {span.offset}: {err}") from None
    return Block([], [], nbytes, expired, span.offset, stored)


def block_writer(fd: int) -> Callable[[list[bytes], list[bytes], int, int], int] | None:
    """``write_snapshot``'s ``append_block`` for a file, from the compiled path (None when it
    is not built): a block written at the file's position straight from the objects."""
    if _snapshotio is None:
        return None
    append = _snapshotio.append_block
    return lambda keys, vals, start, stop: append(fd, keys, vals, start, stop)


def _check_block(view: memoryview, start: int, end: int) -> Span:
    plen, count, crc = _BLOCK.unpack_from(view, start)
    at = start + _BLOCK.size
    if at + plen != end or count == 0 or 5 * count > plen:
        raise Refused("corrupt", f"block at {start}: its length does not match the index")
    if zlib.crc32(view[at : at + plen], zlib.crc32(_BLOCK_CRC.pack(plen, count))) != crc:
        raise Refused("corrupt", f"block at {start}: checksum mismatch")
    klens = bytes(view[at : at + count])
    ilens = array("I")
    ilens.frombytes(view[at + count : at + 5 * count])
    if not _LITTLE:
        ilens.byteswap()
    if 5 * count + sum(klens) + sum(ilens) != plen or min(ilens) < MIN_ITEM or min(klens) == 0:
        raise Refused("corrupt", f"block at {start}: lengths do not add up")
    return Span(start, at, plen, count)


def _read_block(stream: Stream, span: Span, now: int) -> Block:
    at, count = span.at, span.count
    stream.seek(at)
    klens = stream.read(count)
    ilens = array("I")
    ilens.frombytes(stream.read(4 * count))
    if not _LITTLE:
        ilens.byteswap()
    key_start = 5 * count
    # One C call per key and per item, no offsets or slice objects: read them in order.
    stream.seek(at + key_start)
    keys = list(map(stream.read, klens))
    items = list(map(stream.read, ilens))
    # Every item's exptime (bytes 8-12), gathered with one small copy per item.
    exptimes = array("I")
    exptimes.frombytes(b"".join(map(_EXPTIME_BYTES, items)))
    if not _LITTLE:
        exptimes.byteswap()
    expired = 0
    soonest = min(filter(None, exptimes), default=0)
    if soonest and soonest <= now:
        live = [e == 0 or e > now for e in exptimes]
        expired = count - sum(live)
        keys = [k for k, keep in zip(keys, live, strict=True) if keep]
        items = [v for v, keep in zip(items, live, strict=True) if keep]
        nbytes = sum(map(len, keys)) + sum(map(len, items))
    else:
        nbytes = span.size - key_start
    return Block(keys, items, nbytes, expired, span.offset, len(keys))
