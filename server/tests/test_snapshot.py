"""The warm-restart snapshot format (storage/snapshot.py) without a process: a store survives
the round trip exactly, and no truncated or damaged snapshot is ever half-used."""

from __future__ import annotations

import json
import struct
import zlib
from functools import partial

import pytest

from cacheserver.storage import Store
from cacheserver.storage.snapshot import (
    COMPILED,
    FORMAT,
    LAYOUT,
    MIN_ITEM,
    Header,
    Identity,
    Refused,
    Span,
    block_writer,
    check_identity,
    checked_blocks,
    fill_block,
    open_snapshot,
    read_blocks,
    write_snapshot,
)

IDENTITY = Identity("-m 1048576 bytes", 1024 * 1024, 0, 1)
NOW = 1_800_000_000


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# Both readers and writers: the Python one, and the compiled one (storage/_snapshotio.c).
PATHS = [
    "python",
    pytest.param(
        "compiled",
        marks=pytest.mark.skipif(not COMPILED, reason="cacheserver.storage._snapshotio not built"),
    ),
]


def snapshot_of(store: Store, block_bytes: int = 1 << 20) -> bytes:
    header = Header(
        identity=IDENTITY,
        version="test",
        saved_at=float(NOW),
        cas=store.last_cas,
        flush_at=store.flush_at,
        started=float(NOW - 100),
        items=store.curr_items,
        layout=LAYOUT,
    )
    keys, items = store.drain()
    out = bytearray()
    written = write_snapshot(keys, items, header, out.extend, release=True, block_bytes=block_bytes)
    assert written == len(out)
    assert keys == [None] * len(keys)  # released as written
    return bytes(out)


def restore(data: bytes, store: Store, now: int = NOW, path: str = "python") -> Header:
    """Everything or nothing: the store is only filled when every block checked out (the
    compiled path fills it block by block, as the server does, and a failure flushes it)."""

    opened = open_snapshot(data)
    check_identity(opened.header, IDENTITY)
    if path == "compiled":
        try:
            for span in checked_blocks(data, opened):
                store.restore_with(partial(fill_block, data=data, span=span, now=now))
        except Refused:
            store.flush()
            raise
    else:
        blocks = list(read_blocks(data, opened, now))
        for block in blocks:
            store.restore_items(block.keys, block.items, block.nbytes)
    store.restore_state(opened.header.cas, opened.header.flush_at)
    return opened.header


def filled_store(n: int = 300, clock: Clock | None = None) -> Store:
    store = Store(1 << 20, clock=clock or Clock())
    for i in range(n):
        store.set(
            b"key:%d" % i, i * 7919 % (1 << 32), 0 if i % 3 else NOW + 50 + i, b"v" * (i % 97)
        )
    store.get(b"key:5")  # moves to the recent end
    store.touch(b"key:7", NOW + 1000)
    store.append(b"key:9", b"tail")
    return store


@pytest.mark.parametrize("path", PATHS)
def test_round_trip_keeps_items_byte_exact_in_lru_order_with_accounting_and_cas(path) -> None:
    store = filled_store()
    store.flush(NOW + 3600)  # a delayed flush_all still pending
    before = list(store.table.items())
    used, cas = store.bytes_used, store.last_cas
    data = snapshot_of(store, block_bytes=2000)  # many blocks
    assert store.curr_items == 0 and store.bytes_used == 0
    fresh = Store(1 << 20, clock=Clock())
    restore(data, fresh, path=path)
    assert list(fresh.table.items()) == before
    assert fresh.bytes_used == used
    assert fresh.last_cas == cas
    assert fresh.flush_at == NOW + 3600
    fresh.set(b"new", 0, 0, b"x")
    assert fresh.get(b"new")[:8] == struct.pack("<Q", cas + 1)  # CAS values stay unique


def test_items_expired_by_the_time_of_the_restore_are_left_out() -> None:
    store = filled_store(50)
    expiring = {k for k, v in store.table.items() if struct.unpack_from("<I", v, 8)[0]}
    data = snapshot_of(store, block_bytes=500)

    later = NOW + 50 + 20  # items with exptime NOW+50+i for i <= 20 are gone
    blocks = list(read_blocks(data, open_snapshot(data), later))
    kept = {k for b in blocks for k in b.keys}
    gone = {k for k in expiring if int(k.split(b":")[1]) <= 20 and k != b"key:7"}
    assert gone and not gone & kept
    assert sum(b.expired for b in blocks) == len(gone)
    assert len(kept) == 50 - len(gone)
    if COMPILED:  # the compiled reader leaves out the same items, and counts the same
        fresh = Store(1 << 20, clock=Clock(later))
        opened = open_snapshot(data)
        filled = [
            fresh.restore_with(partial(fill_block, data=data, span=span, now=later))
            for span in checked_blocks(data, opened)
        ]
        assert list(fresh.table) == [k for b in blocks for k in b.keys]
        assert [(f.count, f.nbytes, f.expired) for f in filled] == [
            (len(b.keys), b.nbytes, b.expired) for b in blocks
        ]


def test_an_empty_store_round_trips() -> None:
    data = snapshot_of(Store(1 << 20, clock=Clock()))
    fresh = Store(1 << 20, clock=Clock())
    restore(data, fresh)
    assert fresh.curr_items == 0


def _small_snapshot() -> bytes:
    return snapshot_of(filled_store(12), block_bytes=300)


@pytest.mark.parametrize("path", PATHS)
def test_every_truncation_is_refused(path) -> None:
    data = _small_snapshot()
    for cut in range(len(data)):
        fresh = Store(1 << 20, clock=Clock())
        with pytest.raises(Refused) as refused:
            restore(data[:cut], fresh, path=path)
        assert refused.value.reason in ("truncated", "corrupt"), cut
        assert fresh.curr_items == 0


@pytest.mark.parametrize("path", PATHS)
def test_every_single_bit_flip_is_refused(path) -> None:
    data = _small_snapshot()
    for at in range(len(data)):
        for bit in range(8):
            damaged = bytearray(data)
            damaged[at] ^= 1 << bit
            fresh = Store(1 << 20, clock=Clock())
            with pytest.raises(Refused):
                restore(bytes(damaged), fresh, path=path)
            assert fresh.curr_items == 0


@pytest.mark.skipif(not COMPILED, reason="cacheserver.storage._snapshotio not built")
def test_the_compiled_writer_writes_the_same_bytes(tmp_path) -> None:
    """Straight from the objects with pwritev, the header written after its payload: the
    file is byte for byte what the Python writer makes."""
    expected = snapshot_of(filled_store(), block_bytes=2000)
    store = filled_store()
    header = open_snapshot(expected).header
    keys, items = store.drain()
    path = tmp_path / "snapshot"
    with path.open("wb", buffering=0) as f:  # (the block writer writes at its position)
        fd = f.fileno()
        written = write_snapshot(
            keys, items, header, f.write, block_bytes=2000, append_block=block_writer(fd)
        )
    assert path.read_bytes() == expected and written == len(expected)


@pytest.mark.skipif(not COMPILED, reason="cacheserver.storage._snapshotio not built")
@pytest.mark.parametrize(
    "lengths",
    [
        [(5, 40), (5, 40), (5, 41)],  # one byte more than the payload holds
        [(5, 40), (0, 45)],  # a key of no bytes
        [(5, 40), (5, MIN_ITEM - 1)],  # an item shorter than its header
    ],
)
def test_a_block_whose_lengths_do_not_add_up_adds_nothing(lengths) -> None:
    """The crc passed (a collision, or a writer's bug): the compiled reader checks every
    length against the payload before it adds a single item."""
    count = len(lengths)
    payload = bytes(k for k, _ in lengths) + b"".join(struct.pack("<I", i) for _, i in lengths)
    payload += b"k" * 5 * count + b"\x00" * 40 * count
    items: dict[bytes, bytes] = {}
    with pytest.raises(Refused) as refused:
        fill_block(items, payload, Span(0, 0, len(payload), count), NOW)
    assert refused.value.reason == "corrupt" and items == {}


def _with_header(data: bytes, change) -> bytes:  # type: ignore[no-untyped-def]
    magic, fmt, head_len, _ = struct.unpack_from("<8sIII", data)
    fields = json.loads(data[20 : 20 + head_len])
    change(fields)
    head = json.dumps(fields).encode()
    # A consistent file, as a writer with other settings would make it: fix the footer too.
    rest = data[20 + head_len :]
    shift = len(head) - head_len
    index_offset, nblocks, items, _crc, end = struct.unpack_from("<QQQI8s", rest, len(rest) - 36)
    index = struct.unpack_from(f"<{nblocks}Q", rest, len(rest) - 36 - 8 * nblocks)
    index_bytes = struct.pack(f"<{nblocks}Q", *(o + shift for o in index))
    head_crc = zlib.crc32(head)
    io = index_offset + shift
    crc = zlib.crc32(struct.pack("<QQQI", io, nblocks, items, head_crc), zlib.crc32(index_bytes))
    body = rest[: len(rest) - 36 - 8 * nblocks]
    return (
        struct.pack("<8sIII", magic, fmt, len(head), head_crc)
        + head
        + body
        + index_bytes
        + struct.pack("<QQQI8s", io, nblocks, items, crc, end)
    )


def test_a_consistent_header_rewrite_is_read() -> None:
    data = _small_snapshot()
    same = _with_header(data, lambda f: f.update(version="other"))
    fresh = Store(1 << 20, clock=Clock())
    assert restore(same, fresh).version == "other"
    assert fresh.curr_items == 12


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda f: f.update(layout=[22, 16, 21, 128, 130]), "version"),
        (lambda f: f["identity"].update(budget="-m 2097152 bytes"), "memory"),
        (lambda f: f["identity"].update(max_item_size=2048), "settings"),
        (lambda f: f["identity"].update(workers=2), "settings"),
        (lambda f: f.pop("cas"), "version"),
    ],
)
def test_other_layouts_settings_and_budgets_are_refused(change, reason: str) -> None:  # type: ignore[no-untyped-def]
    data = _with_header(_small_snapshot(), change)
    with pytest.raises(Refused) as refused:
        restore(data, Store(1 << 20, clock=Clock()))
    assert refused.value.reason == reason


def test_another_format_number_is_refused_as_a_version() -> None:
    data = bytearray(_small_snapshot())
    struct.pack_into("<I", data, 8, FORMAT + 1)
    with pytest.raises(Refused) as refused:
        restore(bytes(data), Store(1 << 20, clock=Clock()))
    assert refused.value.reason == "version"
