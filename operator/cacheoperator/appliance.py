"""What a running appliance says about its warm restart, from its ``stats``: over the
memcached protocol on the pod's address, or -- when the port wants credentials or TLS the
operator does not hold (spec.auth, spec.tls) -- over HTTP from /stats on the metrics port.

Bounded: one connection per worker with a short timeout, and the caller asks each
container start once (the answer does not change while the server runs).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cacheserver.metrics.aggregate import fetch_stats, parse_stats

MAX_REPLY = 1 << 20

READ_TIMEOUT = 1.0  # seconds per worker


@dataclass(frozen=True)
class Restore:
    """A pod's warm restart, all its workers together."""

    result: str  # restored, none (no snapshot), refused, unknown (no answer)
    items: int = 0
    reason: str = ""  # why a snapshot was refused


UNKNOWN = Restore("unknown")

Stats = Callable[[str, int, float], "dict[str, str] | None"]


def http_stats(address: str, port: int, worker: int, sub: str, timeout: float) -> bytes:
    """A worker's ``stats [sub]`` reply from the appliance's HTTP endpoint (the metrics
    port); OSError or ValueError when it cannot be had."""
    host = f"[{address}]" if ":" in address else address
    path = "/stats/settings" if sub == "settings" else "/stats"
    url = f"http://{host}:{port}{path}?worker={worker}"
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        body = reply.read(MAX_REPLY + 1)
    if len(body) > MAX_REPLY:
        raise ValueError("reply too long")
    return body


def fetch_http_stats(address: str, port: int, worker: int, timeout: float) -> dict[str, str] | None:
    try:
        return parse_stats(http_stats(address, port, worker, "", timeout))
    except (OSError, ValueError):
        return None


def read_restore(
    address: str,
    ports: Sequence[int],
    timeout: float = READ_TIMEOUT,
    stats: Stats = fetch_stats,
    http_port: int | None = None,
) -> Restore:
    """Ask every worker of a pod how its start went (over HTTP on ``http_port`` when given);
    ``unknown`` if one does not answer or runs without warm restart."""
    results, reasons, items = [], [], 0
    for worker, port in enumerate(ports):
        if http_port is not None:
            got = fetch_http_stats(address, http_port, worker, timeout)
        else:
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
