"""A request-latency histogram that stays off the hot path.

Only one read in ``SAMPLE_EVERY`` is timed (two clock reads); the rest pay one integer
increment and a bit test. Buckets are plain ints, turned into a Prometheus histogram at
scrape time. What is timed is the server's own work for one read: parsing, running every
request in it, and formatting the replies (the kernel's share is the same for any server).
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping

SAMPLE_EVERY = 64  # a power of two: the check is a mask
SAMPLE_MASK = SAMPLE_EVERY - 1
STATS_NAME = "request_duration"  # its `stats` lines: request_duration_le_<bound>, _sum
BOUNDS_SECONDS = (
    0.000_005,
    0.000_01,
    0.000_025,
    0.000_05,
    0.000_1,
    0.000_25,
    0.000_5,
    0.001,
    0.002_5,
    0.005,
    0.01,
    0.025,
    0.1,
)


class LatencyHistogram:
    __slots__ = ("counts", "reads", "sum_seconds", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS_SECONDS) + 1)  # the last is +Inf
        self.reads = 0  # every read, sampled or not
        self.total = 0  # sampled reads
        self.sum_seconds = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BOUNDS_SECONDS, seconds)] += 1
        self.total += 1
        self.sum_seconds += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound, cumulative count) pairs as Prometheus histograms want them."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*BOUNDS_SECONDS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out

    def stats_fields(self) -> list[tuple[str, object]]:
        """The histogram as ``stats`` lines, so a multi-worker parent can gather it."""
        fields: list[tuple[str, object]] = [
            (f"{STATS_NAME}_le_{bound}", count) for bound, count in self.cumulative()
        ]
        fields.append((f"{STATS_NAME}_sum", f"{self.sum_seconds:.9f}"))
        return fields


def histogram_from_stats(
    stats: Mapping[str, str], name: str = STATS_NAME
) -> tuple[list[tuple[str, float]], float] | None:
    """Buckets and sum back from ``stats`` lines written by ``stats_fields``."""
    prefix = f"{name}_le_"
    buckets = [(k[len(prefix) :], float(v)) for k, v in stats.items() if k.startswith(prefix)]
    if not buckets or f"{name}_sum" not in stats:
        return None
    return buckets, float(stats[f"{name}_sum"])
