"""Warm restart (``-e/--memory-file PATH``, memcached's flag): on a graceful stop (SIGTERM or
SIGUSR1) a worker writes its items to PATH, on node-local memory (tmpfs); the next start with
the same PATH restores them, then removes the file. The format is storage/snapshot.py's.

- The snapshot is written to ``PATH.partial`` and renamed to PATH when complete: a process
  killed while saving leaves no PATH, and a later start removes the partial file.
- A snapshot that is truncated, corrupt, of another format or item layout, or written under
  other settings or another memory budget is refused whole: one log line, the reason in
  ``stats`` and /metrics, and the worker starts empty. It is removed either way: it would be
  refused again, and on tmpfs it holds memory.
- With ``-t N`` (N > 1) worker i uses ``PATH.i``.
- Items are given back while the snapshot grows, and the file is cut shorter as it is
  restored (the least recently used items sit at its end), so neither side holds the cache
  twice for long: tmpfs pages count against the memory cgroup of the process writing them.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import mmap
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from cacheserver.storage import Store
from cacheserver.storage.snapshot import (
    COMPILED,
    LAYOUT,
    MIN_SIZE,
    Block,
    Header,
    Identity,
    Opened,
    Refused,
    block_writer,
    check_identity,
    checked_blocks,
    decode_block,
    fill_block,
    open_snapshot,
    write_snapshot,
)

log = logging.getLogger("cacheserver")

PARTIAL = ".partial"
MIB = 1 << 20


def snapshot_path(path: str, worker: int, workers: int) -> str:
    """The file of one worker: PATH itself for one worker, PATH.<i> with -t N."""
    return path if workers == 1 else f"{path}.{worker}"


def stale_snapshots(path: str, workers: int) -> list[Path]:
    """Snapshots next to PATH that no worker of this server reads (written with another
    -t): they would only hold memory on tmpfs."""
    base = Path(path)
    if not base.parent.is_dir():
        return []
    pattern = re.compile(re.escape(base.name) + r"(\.(\d+))?(" + re.escape(PARTIAL) + ")?$")
    mine = {snapshot_path(base.name, i, workers) for i in range(workers)}
    stale = []
    for entry in base.parent.iterdir():
        match = pattern.match(entry.name)
        if match and entry.name not in mine and not match.group(3):
            stale.append(entry)
    return sorted(stale)


def remove_stale_snapshots(path: str, workers: int) -> None:
    for stale in stale_snapshots(path, workers):
        log.warning(
            "warm restart: removed snapshot %s: written by a server with another number of "
            "workers (-t %d now)",
            stale,
            workers,
        )
        with contextlib.suppress(OSError):
            stale.unlink()


@dataclass
class Outcome:
    """What the start did with the snapshot; reported by ``stats`` and /metrics."""

    result: str = "none"  # none (no snapshot), restored, refused
    reason: str = ""  # why it was refused: truncated, corrupt, version, settings, memory...
    items: int = 0  # items restored
    nbytes: int = 0  # bytes of keys and items restored
    expired: int = 0  # items dropped because they had expired
    evicted: int = 0  # items evicted because they did not fit the capacity
    seconds: float = 0.0


class WarmRestart:
    def __init__(
        self, path: str, identity: Identity, version: str, started: float | None = None
    ) -> None:
        self.path = path
        self.identity = identity
        self.version = version
        self.started = time.time() if started is None else started
        self.outcome = Outcome()
        self.saved_items = 0

    # -- start ---------------------------------------------------------------------------------

    def restore(self, store: Store) -> Outcome:
        """Fill the (empty) store from the snapshot, if there is one that checks out."""
        path = self.path
        partial = path + PARTIAL
        if os.path.exists(partial):
            log.warning(
                "warm restart: removed %s: a save that did not finish (killed while saving)",
                partial,
            )
            with contextlib.suppress(OSError):
                os.unlink(partial)
        began = time.monotonic()
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            log.info("warm restart: no snapshot at %s; starting empty", path)
            return self.outcome
        except OSError as err:
            return self._refuse(store, Refused("unreadable", str(err)))
        try:
            self._restore_from(fd, store, began)
        except Refused as refused:
            self._refuse(store, refused)
        except OSError as err:
            self._refuse(store, Refused("unreadable", str(err)))
        finally:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)  # used once: a later crash must not bring back stale items
        return self.outcome

    def _restore_from(self, fd: int, store: Store, began: float) -> None:
        size = os.fstat(fd).st_size
        if size < MIN_SIZE:
            raise Refused("truncated", f"{size} bytes is shorter than an empty snapshot")
        # The file's pages mapped at once (no fault per page); keys and items are copied
        # straight out of them.
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with mmap.mmap(fd, size, flags=flags, prot=mmap.PROT_READ) as data:
            self._restore_mapped(fd, data, store, began)

    def _restore_mapped(self, fd: int, data: mmap.mmap, store: Store, began: float) -> None:
        opened = open_snapshot(data)
        header = opened.header
        check_identity(header, self.identity)
        now = store.now()
        out = self.outcome
        if header.flush_at and header.flush_at <= now:
            # A delayed flush_all came due while the server was down: nothing survives it.
            store.restore_state(header.cas, 0)
            out.result, out.expired = "restored", header.items
            log.info("warm restart: a flush_all came due while stopped; starting empty")
            return
        items = nbytes = expired = 0
        for block in self._blocks(data, opened, store, now):
            items += block.count
            nbytes += block.nbytes
            expired += block.expired
            # On tmpfs that block's memory goes back now. Nothing reads past this offset
            # again, so the mapping of the cut-off pages is never touched.
            os.ftruncate(fd, block.offset)
        store.restore_state(header.cas, header.flush_at)
        evictions = store.stats.evictions
        store.set_capacity(store.capacity)  # a smaller capacity than the writer's: evict LRU
        out.evicted = store.stats.evictions - evictions
        self.started = header.started
        out.result, out.items, out.nbytes, out.expired = "restored", items, nbytes, expired
        out.items -= out.evicted
        out.seconds = time.monotonic() - began
        log.info(
            "warm restart: restored %d items (%.1f MiB) from %s in %.3f s (%.2f GB/s), "
            "saved by %s %.1f s ago; %d expired items dropped, %d evicted to fit",
            out.items,
            nbytes / MIB,
            self.path,
            out.seconds,
            nbytes / max(out.seconds, 1e-9) / 1e9,
            header.version,
            max(time.time() - header.saved_at, 0.0),
            expired,
            out.evicted,
        )

    @staticmethod
    def _blocks(data: mmap.mmap, opened: Opened, store: Store, now: int) -> Iterator[Block]:
        """Each checked block's items put in the store, least recently used first: by the
        compiled loop straight into its dict, else through lists."""
        for span in checked_blocks(data, opened):
            if not COMPILED:
                block = decode_block(data, span, now)
                store.restore_items(block.keys, block.items, block.nbytes)
                yield block
                continue
            yield store.restore_with(partial(fill_block, data=data, span=span, now=now))

    def _refuse(self, store: Store, refused: Refused) -> Outcome:
        store.flush()  # never half-used: whatever was restored before the fault goes
        store.restore_state(0, 0)
        self.outcome = Outcome(result="refused", reason=refused.reason)
        log.error(
            "warm restart: refused snapshot %s (%s: %s); starting empty",
            self.path,
            refused.reason,
            refused.detail,
        )
        return self.outcome

    # -- stop ----------------------------------------------------------------------------------

    def save(self, store: Store) -> bool:
        """Write every item to the snapshot; the store is empty afterwards. False on error."""
        began = time.monotonic()
        path, partial = self.path, self.path + PARTIAL
        header = Header(
            identity=self.identity,
            version=self.version,
            saved_at=time.time(),
            cas=store.last_cas,
            flush_at=store.flush_at,
            started=self.started,
            items=store.curr_items,
            layout=LAYOUT,
        )
        keys, items = store.drain()
        written = 0
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                trim = _Trimmer()

                def write(data: bytes) -> None:
                    _write_all(fd, data)
                    trim.after(len(data))

                append = block_writer(fd)

                def append_block(keys: list[bytes], vals: list[bytes], a: int, b: int) -> int:
                    written = append(keys, vals, a, b)  # type: ignore[misc]
                    trim.after(written)
                    return written

                written = write_snapshot(
                    keys,
                    items,
                    header,
                    write,
                    release=True,
                    append_block=append_block if append is not None else None,
                )
            finally:
                os.close(fd)
            os.rename(partial, path)
        except OSError as err:
            log.error("warm restart: could not save the snapshot to %s: %s", path, err)
            with contextlib.suppress(OSError):
                os.unlink(partial)
            return False
        seconds = time.monotonic() - began
        self.saved_items = header.items
        log.info(
            "warm restart: saved %d items (%.1f MiB) to %s in %.3f s (%.2f GB/s)",
            header.items,
            written / MIB,
            path,
            seconds,
            written / max(seconds, 1e-9) / 1e9,
        )
        return True

    # -- reporting -----------------------------------------------------------------------------

    def stats_fields(self) -> list[tuple[str, object]]:
        out = self.outcome
        return [
            ("warm_restart", out.result),
            ("warm_restart_reason", out.reason or "-"),
            ("warm_restart_restored_items", out.items),
            ("warm_restart_restored_bytes", out.nbytes),
            ("warm_restart_expired_items", out.expired),
            ("warm_restart_restore_seconds", f"{out.seconds:.3f}"),
        ]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class _Trimmer:
    """Asks the C allocator to give freed memory back every so many bytes written, so the
    items dropped while saving leave the process instead of waiting on its free lists."""

    EVERY = 64 * MIB

    def __init__(self) -> None:
        self.pending = 0
        self._trim = _malloc_trim()

    def after(self, nbytes: int) -> None:
        self.pending += nbytes
        if self.pending >= self.EVERY and self._trim is not None:
            self.pending = 0
            self._trim(0)


def _malloc_trim():  # type: ignore[no-untyped-def]
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc's, already loaded
    except (OSError, AttributeError):  # another C library
        return None
