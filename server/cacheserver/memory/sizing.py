"""How many bytes of items the store may hold: the limit, less what the process needs anyway,
less headroom for everything the server does not account (sidecars, page cache, bursts).

Pure functions: the measured inputs come in as arguments.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .limits import MemoryLimit

KIB = 1 << 10
MIB = 1 << 20

MIN_HEADROOM = 32 * MIB
HEADROOM_FRACTION = 0.10
# Below 128 MiB the 32 MiB floor would take more than a quarter of the limit (all of what
# the interpreter leaves in a 64 MiB container, memcached's default size): there the
# headroom is a quarter of the limit instead.
SMALL_LIMIT_HEADROOM_FRACTION = 0.25
# A connection costs a transport, a protocol object and its pending buffers (Python objects).
CONNECTION_BYTES = 8 * KIB
# Items at most this many times the maximum item size are in flight per worker at once
# (a request being read, a response being written).
IN_FLIGHT_ITEMS = 4
MIN_CAPACITY = 1 * MIB


class SizingError(ValueError):
    """The limit leaves no room for items; the message says which numbers and what to change."""


@dataclass(frozen=True)
class Baseline:
    """Memory the server uses whatever the store holds."""

    resident: int  # the interpreter(s), measured at start
    connections: int  # allowance for the connection limit
    buffers: int  # allowance for large items in flight

    @property
    def total(self) -> int:
        return self.resident + self.connections + self.buffers


def baseline_for(
    resident_bytes: int, conn_limit: int, max_item_size: int, workers: int = 1
) -> Baseline:
    """The baseline of `workers` processes, each measured at `resident_bytes` at start."""
    if resident_bytes < 0 or conn_limit < 0 or max_item_size < 0 or workers < 1:
        raise ValueError("baseline inputs must be non-negative, with at least one worker")
    return Baseline(
        resident=resident_bytes * workers,
        connections=conn_limit * CONNECTION_BYTES,
        buffers=max_item_size * IN_FLIGHT_ITEMS * workers,
    )


def default_headroom(limit_bytes: int) -> int:
    """10% of the limit, but at least 32 MiB, or a quarter of the limit if that is less."""
    floor = min(MIN_HEADROOM, int(limit_bytes * SMALL_LIMIT_HEADROOM_FRACTION))
    return max(floor, int(limit_bytes * HEADROOM_FRACTION))


def mib(nbytes: int) -> str:
    return f"{nbytes / MIB:.1f} MiB"


DEFAULT_HEADROOM_RULE = (
    f"default max(min({mib(MIN_HEADROOM)}, {SMALL_LIMIT_HEADROOM_FRACTION:.0%} of the limit), "
    f"{HEADROOM_FRACTION:.0%} of the limit)"
)


@dataclass(frozen=True)
class MemoryPlan:
    """The sizing decision and where each number came from."""

    limit: int
    limit_source: str
    baseline: Baseline
    headroom: int
    headroom_source: str
    capacity: int  # bytes of items, all workers together
    sizing: str  # "auto" (from the limit) or "fixed" (-m MB)
    warnings: tuple[str, ...] = ()

    @property
    def auto_capacity(self) -> int:
        """What -m auto gives for this limit (the ceiling the shrinker grows back to)."""
        return self.limit - self.baseline.total - self.headroom

    def settings(self) -> list[tuple[str, str | int]]:
        """Name/value pairs for `stats settings`."""
        return [
            ("memory_sizing", self.sizing),
            ("memory_limit", self.limit),
            ("memory_limit_source", self.limit_source),
            ("memory_capacity", self.capacity),
            ("memory_headroom", self.headroom),
            ("memory_baseline", self.baseline.total),
        ]

    def describe(self) -> list[str]:
        """One log line per number, saying where it came from."""
        b = self.baseline
        return [
            f"memory limit {mib(self.limit)} from {self.limit_source}",
            f"memory baseline {mib(b.total)}: resident at start {mib(b.resident)}, "
            f"connections {mib(b.connections)}, in-flight items {mib(b.buffers)}",
            f"memory headroom {mib(self.headroom)} from {self.headroom_source}",
            f"memory capacity {mib(self.capacity)} ({self.sizing})",
        ]

    def log(self, logger: logging.Logger) -> None:
        for line in self.describe():
            logger.info("%s", line)
        for warning in self.warnings:
            logger.warning("%s", warning)


def plan_memory(
    limit: MemoryLimit,
    baseline: Baseline,
    *,
    headroom_mb: float | None = None,
    memory_mb: float | None = None,
) -> MemoryPlan:
    """Size the store: capacity = limit - baseline - headroom, or `memory_mb` if given.

    Raises SizingError when the limit cannot hold the baseline, the headroom and a minimal
    store, or when an explicit number is not positive.
    """
    warnings = list(limit.warnings)
    if headroom_mb is None:
        headroom = default_headroom(limit.limit_bytes)
        headroom_source = DEFAULT_HEADROOM_RULE
    else:
        if headroom_mb < 0:
            raise SizingError(f"--memory-headroom must be 0 or more MB, got {headroom_mb}")
        headroom = int(headroom_mb * MIB)
        headroom_source = "--memory-headroom"
    auto = limit.limit_bytes - baseline.total - headroom

    if memory_mb is not None:
        if memory_mb <= 0:
            raise SizingError(f"-m/--memory-limit must be a positive number of MB, got {memory_mb}")
        capacity = int(memory_mb * MIB)
        if capacity > auto:
            warnings.append(
                f"-m {memory_mb:g} MB does not fit in the {mib(limit.limit_bytes)} limit "
                f"({limit.source}) next to the baseline and headroom "
                f"(-m auto would give {mib(max(auto, 0))}); the shrinker will evict early "
                "when memory runs low"
            )
        sizing = "fixed"
    else:
        if auto < MIN_CAPACITY:
            raise SizingError(
                f"the memory limit {mib(limit.limit_bytes)} ({limit.source}) leaves "
                f"{mib(max(auto, 0))} for items after the baseline {mib(baseline.total)} and "
                f"the headroom {mib(headroom)}; raise the limit or lower --memory-headroom"
            )
        capacity = auto
        sizing = "auto"
    return MemoryPlan(
        limit=limit.limit_bytes,
        limit_source=limit.source,
        baseline=baseline,
        headroom=headroom,
        headroom_source=headroom_source,
        capacity=capacity,
        sizing=sizing,
        warnings=tuple(warnings),
    )
