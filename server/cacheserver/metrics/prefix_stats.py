"""Per-prefix counters of ``stats detail on|off|dump``, as memcached keeps them.

With detail on, every key of a text get, a storage command and a delete is counted under its
prefix (the part before the first ``:``; keys without one are not counted). ``dump`` lists
the prefixes in memcached's order: its 256 hash buckets (murmur3 of the prefix, memcached's
default hash), the newest prefix first within a bucket. Plain ints, no I/O.
"""

from __future__ import annotations

DELIMITER = 0x3A  # ":", memcached's default -D
BUCKETS = 256  # memcached's PREFIX_HASH_SIZE
_M32 = 0xFFFFFFFF


def murmur3_32(data: bytes) -> int:
    """MurmurHash3 (x86, 32-bit, seed 0): memcached 1.6's default hash."""
    h = 0
    c1, c2 = 0xCC9E2D51, 0x1B873593
    end = len(data) & ~3
    for i in range(0, end, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * c1) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        k = (k * c2) & _M32
        h ^= k
        h = ((h << 13) | (h >> 19)) & _M32
        h = (h * 5 + 0xE6546B64) & _M32
    tail = data[end:]
    if tail:
        k = int.from_bytes(tail, "little")
        k = (k * c1) & _M32
        k = ((k << 15) | (k >> 17)) & _M32
        k = (k * c2) & _M32
        h ^= k
    h ^= len(data)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


class PrefixStats:
    """The counters; ``record_*`` are called by the protocol layer while detail is on."""

    def __init__(self) -> None:
        # bucket -> [prefix, gets, hits, sets, deletes], newest first
        self._buckets: dict[int, list[list]] = {}

    def clear(self) -> None:
        self._buckets = {}

    def _find(self, key: bytes) -> list | None:
        end = key.find(b":")
        nul = key.find(b"\x00")
        if end < 0 or 0 <= nul < end:  # memcached stops looking at a NUL
            return None
        prefix = key[:end]
        chain = self._buckets.setdefault(murmur3_32(prefix) % BUCKETS, [])
        for entry in chain:
            # memcached compares only the key's prefix length (strncmp), so a stored
            # "ab" also counts the keys of "a".
            if entry[0][:end] == prefix:
                return entry
        entry = [prefix, 0, 0, 0, 0]
        chain.insert(0, entry)
        return entry

    def record_get(self, key: bytes, hit: bool) -> None:
        entry = self._find(key)
        if entry is not None:
            entry[1] += 1
            if hit:
                entry[2] += 1

    def record_set(self, key: bytes) -> None:
        entry = self._find(key)
        if entry is not None:
            entry[3] += 1

    def record_delete(self, key: bytes) -> None:
        entry = self._find(key)
        if entry is not None:
            entry[4] += 1

    def dump(self) -> bytes:
        lines = [
            b"PREFIX %s get %d hit %d set %d del %d\r\n" % tuple(entry)
            for bucket in sorted(self._buckets)
            for entry in self._buckets[bucket]
        ]
        lines.append(b"END\r\n")
        return b"".join(lines)
