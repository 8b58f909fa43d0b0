"""Storage layer: the item store (capacity in bytes, LRU, expiry, CAS). No I/O, no protocol."""

from cacheserver.storage.store import Outcome, Store, StoreStats

__all__ = ["Outcome", "Store", "StoreStats"]
