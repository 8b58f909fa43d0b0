"""The compiled fast path for plain gets and sets (the C files here), when it was built.

The extension is optional: without a C compiler at install time the server runs on its
Python layers alone, with the same replies, only slower. ``make_engine`` returns None then,
or when ``--python-only`` asks for the Python path.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cacheserver.discovery.membership import CLUSTER_KEY
from cacheserver.protocol.commands import MAX_RELATIVE_EXPTIME
from cacheserver.protocol.session import TCP_REPLY_LIMIT
from cacheserver.storage import item as _item
from cacheserver.storage.store import BUMP_INTERVAL

if TYPE_CHECKING:
    from cacheserver.metrics.counters import Counters
    from cacheserver.metrics.latency import LatencyHistogram
    from cacheserver.protocol.commands import Commands
    from cacheserver.storage import Store

try:
    from cacheserver.fastpath import _fastpath
except ImportError:  # not compiled: the Python path serves everything
    _fastpath = None

# The C code reads and writes items in storage/item.py's layout and follows store.py's LRU
# rule, the protocol's exptime rule, the session's reply limit and the key it leaves to the
# session for auto discovery; a change on one side without the other must stop the server,
# not corrupt items.
if _fastpath is not None:
    _ours = (
        _item.HEADER_SIZE,
        _item.BUMPED_AT,
        _item.META_AT,
        _item.MARKS_AT,
        _item.FETCHED,
        BUMP_INTERVAL,
        MAX_RELATIVE_EXPTIME,
        TCP_REPLY_LIMIT,
        CLUSTER_KEY.decode(),
    )
    _built = (
        _fastpath.HEADER_SIZE,
        _fastpath.BUMPED_AT,
        _fastpath.META_AT,
        _fastpath.MARKS_AT,
        _fastpath.FETCHED,
        _fastpath.BUMP_INTERVAL,
        _fastpath.MAX_RELATIVE_EXPTIME,
        _fastpath.REPLY_LIMIT,
        _fastpath.CLUSTER_KEY,
    )
    if _ours != _built:
        raise ImportError(
            f"cacheserver's compiled fast path was built for item layout {_built}, the Python "
            f"code has {_ours}: rebuild it (pip install -e . or scripts/bootstrap.sh)"
        )
Engine = None if _fastpath is None else _fastpath.Engine

AVAILABLE = Engine is not None


def make_engine(
    store: Store,
    counters: Counters,
    latency: LatencyHistogram,
    commands: Commands | None = None,
) -> Any | None:
    """The fast path for one worker; with ``commands``, it steps aside while ``stats detail``
    is on (the Python path counts every key then, as memcached does)."""
    if Engine is None:
        return None
    return Engine(store, counters, latency, _item.ITEM_OVERHEAD, commands)
