"""How memcached 1.6 would account an item: its total size and its slab class.

This server keeps items in one dict, not in slab classes, but a few replies report what
memcached's allocator would have done with the item: ``me`` and ``lru_crawler metadump``
print ``cls=`` and ``size=``, ``stats cachedump`` lists one class. The numbers here are
memcached's for its default slab settings (``-n 48``, ``-f 1.25``, 1 MiB pages) and this
server's ``-I``, so those replies stay byte-equal to memcached's. Pure arithmetic, no I/O.
"""

from __future__ import annotations

ITEM_HEADER = 48  # sizeof(item) on a 64-bit build
CAS_SIZE = 8
CHUNK_ALIGN = 8
SLAB_PAGE = 1024 * 1024
MAX_CLASSES = 63  # memcached's MAX_NUMBER_OF_SLAB_CLASSES - 1


def item_total(nkey: int, nbytes: int, flags: int) -> int:
    """memcached's ITEM_ntotal: header, key and its NUL, the value with its CRLF, the client
    flags (stored only when not zero) and the CAS."""
    return ITEM_HEADER + nkey + 1 + nbytes + 2 + (4 if flags else 0) + CAS_SIZE


class SlabClasses:
    """The chunk size of each slab class, as memcached's slabs_init computes them."""

    def __init__(self, item_size_max: int, chunk_size: int = 48, factor: float = 1.25) -> None:
        self.chunk_max = min(SLAB_PAGE // 2, item_size_max)
        self.item_size_max = item_size_max
        sizes: list[int] = []
        size = ITEM_HEADER + chunk_size
        while len(sizes) < MAX_CLASSES - 1 and size < self.chunk_max / factor:
            if size % CHUNK_ALIGN:
                size += CHUNK_ALIGN - size % CHUNK_ALIGN
            sizes.append(size)
            size = int(size * factor)
        sizes.append(self.chunk_max)
        self.sizes = sizes  # class i (from 1) has chunks of sizes[i - 1] bytes

    @property
    def largest(self) -> int:
        return len(self.sizes)

    def class_of_size(self, ntotal: int) -> int:
        """memcached's slabs_clsid: the smallest class whose chunks hold ``ntotal`` bytes."""
        if ntotal == 0 or ntotal > self.item_size_max:
            return 0
        for clsid, size in enumerate(self.sizes, 1):
            if ntotal <= size:
                return clsid
        return self.largest

    def class_of_item(self, nkey: int, nbytes: int, flags: int) -> int:
        """The class memcached links an item into (a large item, split into chunks, is linked
        into the largest class)."""
        return self.class_of_size(item_total(nkey, nbytes, flags))
