"""What a running appliance says about its warm restart: the one place the operator talks
to a cache server, over the memcached protocol (``stats``) on the pod's address.

Bounded: one connection per worker with a short timeout, and the caller asks each
container start once (the answer does not change while the server runs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cacheserver.metrics.aggregate import fetch_stats

READ_TIMEOUT = 1.0  # seconds per worker


@dataclass(frozen=True)
class Restore:
    """A pod's warm restart, all its workers together."""

    result: str  # restored, none (no snapshot), refused, unknown (no answer)
    items: int = 0
    reason: str = ""  # why a snapshot was refused


UNKNOWN = Restore("unknown")

Stats = Callable[[str, int, float], "dict[str, str] | None"]


def read_restore(
    address: str, ports: Sequence[int], timeout: float = READ_TIMEOUT, stats: Stats = fetch_stats
) -> Restore:
    """Ask every worker of a pod how its start went; ``unknown`` if one does not answer or
    runs without warm restart."""
    results, reasons, items = [], [], 0
    for port in ports:
        got = stats(address, port, timeout)
        if got is None or "warm_restart" not in got:
            return UNKNOWN
        results.append(got["warm_restart"])
        if got.get("warm_restart_reason", "-") != "-":
            reasons.append(got["warm_restart_reason"])
        try:
            items += int(got.get("warm_restart_restored_items", "0"))
        except ValueError:
            return UNKNOWN
    if not results:
        return UNKNOWN
    # One refused worker is news even when the others restored.
    for result in ("refused", "restored", "none"):
        if result in results:
            return Restore(result, items, ", ".join(sorted(set(reasons))))
    return UNKNOWN
