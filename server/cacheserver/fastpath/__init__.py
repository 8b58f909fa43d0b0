"""The compiled fast path for plain gets and sets (the C files here).

The server does without it when ``--python-only`` asks for the Python path, which gives the
same replies, only slower. The extension is built with the store core it calls
(``storage/core.h``); what else the C code shares with the Python layers, constants and
public names, is declared in ``boundary.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# Its import reads boundary.CONSTANTS and checks the store core's version: values the C code
# is not written for stop the server here (an ImportError naming them), not a request later.
from cacheserver.fastpath import _fastpath

if TYPE_CHECKING:
    from cacheserver.metrics.counters import Counters
    from cacheserver.metrics.latency import LatencyHistogram
    from cacheserver.protocol.commands import Commands
    from cacheserver.storage import Store

Engine = _fastpath.Engine


def make_engine(
    store: Store,
    counters: Counters,
    latency: LatencyHistogram,
    commands: Commands | None = None,
) -> Any:
    """The fast path for one worker; with ``commands``, it steps aside while ``stats detail``
    is on (the Python path counts every key then, as memcached does)."""
    return Engine(store, counters, latency, commands)
