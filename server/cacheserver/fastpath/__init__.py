"""The compiled fast path for plain gets and sets (``_fastpath.c``), when it was built.

The extension is optional: without a C compiler at install time the server runs on its
Python layers alone, with the same replies, only slower. ``make_engine`` returns None then,
or when ``--python-only`` asks for the Python path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cacheserver.storage.item import HEADER_SIZE, ITEM_OVERHEAD

if TYPE_CHECKING:
    from cacheserver.metrics.counters import Counters
    from cacheserver.metrics.latency import LatencyHistogram
    from cacheserver.storage import Store

try:
    from cacheserver.fastpath._fastpath import Engine
except ImportError:  # not compiled: the Python path serves everything
    Engine = None

# _fastpath.c writes and reads items in this layout; a change to storage/item.py must change
# the C side too.
assert HEADER_SIZE == 17

AVAILABLE = Engine is not None


def make_engine(store: Store, counters: Counters, latency: LatencyHistogram) -> Any | None:
    if Engine is None:
        return None
    return Engine(store, counters, latency, ITEM_OVERHEAD)
