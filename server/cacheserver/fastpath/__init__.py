"""The compiled fast path for plain gets and sets (the C files here), when it was built.

The extension is optional: without a C compiler at install time the server runs on its
Python layers alone, with the same replies, only slower. ``make_engine`` returns None then,
or when ``--python-only`` asks for the Python path. What the C code shares with the Python
layers, constants and public names, is declared in ``boundary.py``.
"""

from __future__ import annotations

from importlib.util import find_spec
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cacheserver.metrics.counters import Counters
    from cacheserver.metrics.latency import LatencyHistogram
    from cacheserver.protocol.commands import Commands
    from cacheserver.storage import Store

if find_spec("cacheserver.fastpath._fastpath") is None:
    _fastpath = None  # not compiled: the Python path serves everything
else:
    # Its import reads boundary.CONSTANTS: values the C code is not written for stop the
    # server here (an ImportError naming the constant), not a request later.
    from cacheserver.fastpath import _fastpath

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
    return Engine(store, counters, latency, commands)
