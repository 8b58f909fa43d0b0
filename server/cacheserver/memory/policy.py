"""When to give memory back and when to take it again: pure decisions over readings.

When the working set is above the high watermark, or is rising fast enough to cross it
before the next check, or at critical pressure, the store is shrunk so that the working set
falls to the low watermark, and its capacity is lowered to match so it does not refill.
Once memory has been calm for a while the capacity grows back in small steps, never past
the planned capacity and never so far that the working set would cross the high watermark.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .pressure import PressureLevel
from .sizing import MIB, mib


@dataclass(frozen=True)
class Watermarks:
    high: int
    low: int


def watermarks_for(limit: int, headroom: int) -> Watermarks:
    """High halfway into the headroom, low as far below the planned working set again.

    A store at its planned capacity leaves the working set near `limit - headroom`, between
    the two: normal operation never shrinks, and a shrink frees a useful amount.
    """
    high = limit - headroom // 2
    low = min(limit - headroom * 3 // 2, high - MIB)
    return Watermarks(high=max(high, 0), low=max(low, 0))


@dataclass(frozen=True)
class ShrinkPolicy:
    """Tunables of the shrinker (seconds and fractions)."""

    interval: float = 0.1  # working-set check while memory is quiet (about 80 µs of reads)
    alert_interval: float = 0.02  # while something outside the store grows, or under pressure
    alert_hold: float = 1.0  # stay alert this long after the last sign
    alert_growth: int = MIB  # growth outside the store between two checks that raises alert
    cooldown: float = 0.1  # between two shrinks, so the next reading shows the first
    trim_every: float = 1.0  # above the low watermark, return free heap pages this often
    calm: float = 30.0  # no shrink and no pressure for this long before growing back
    grow_every: float = 5.0  # at most one growth step per this many seconds
    grow_fraction: float = 0.05  # of the planned capacity, per step
    critical_fraction: float = 0.5  # of the headroom, released at critical pressure
    min_capacity: int = MIB  # the store keeps at least this much, per shard


@dataclass(frozen=True)
class Reading:
    working_set: int  # of everything the limit applies to (the cgroup), not just the store
    pressure: PressureLevel
    store_bytes: int  # this shard's accounted bytes
    store_capacity: int  # this shard's capacity now


@dataclass(frozen=True)
class Shrink:
    target_bytes: int  # evict least recently used items down to this
    capacity: int  # then hold the store at this
    reason: str


@dataclass(frozen=True)
class Grow:
    capacity: int


Action = Shrink | Grow | None


class ShrinkController:
    """Turns readings into actions for one shard of the store.

    The working set is shared by every shard in the cgroup, so each shard releases its share
    (1/shards) of the excess.
    """

    def __init__(
        self,
        watermarks: Watermarks,
        max_capacity: int,
        headroom: int,
        policy: ShrinkPolicy | None = None,
        shards: int = 1,
    ) -> None:
        if shards < 1:
            raise ValueError("shards must be at least 1")
        self.watermarks = watermarks
        self.max_capacity = max_capacity
        self.headroom = headroom
        self.policy = policy or ShrinkPolicy()
        self.shards = shards
        self.grow_step = max(MIB, int(max_capacity * self.policy.grow_fraction))
        self._last_shrink = -math.inf
        self._last_pressure = -math.inf
        self._last_grow = -math.inf
        self._last_alert = -math.inf
        self._previous: tuple[float, int, int] | None = None
        self._growth = 0

    def set_max_capacity(self, nbytes: int) -> None:
        """A new planned capacity (the cache_memlimit command): calm periods grow to it."""
        self.max_capacity = nbytes

    def next_interval(self, now: float) -> float:
        """Seconds until the next check: short while on alert."""
        alert = now - self._last_alert < self.policy.alert_hold
        return self.policy.alert_interval if alert else self.policy.interval

    def projected(self, reading: Reading, now: float) -> int:
        """The working set two checks from now, if what grows outside the store (a sidecar,
        buffers) keeps growing as fast as since the previous reading. Such growth also puts
        the controller on alert (checks every alert_interval).

        Growth of the store itself does not count: its capacity bounds it.
        """
        policy, previous = self.policy, self._previous
        if previous is not None:
            then, working_set, store_bytes = previous
            elapsed = now - then
            if elapsed < policy.alert_interval / 2:
                return reading.working_set + self._growth  # too soon to measure a new rate
            store_growth = max(0, reading.store_bytes - store_bytes) * self.shards
            other_growth = reading.working_set - working_set - store_growth
            if other_growth >= policy.alert_growth:
                self._last_alert = now
            fresh = elapsed <= 4 * policy.interval
            rate = max(0, other_growth) / elapsed if fresh else 0.0
            self._growth = int(rate * 2 * self.next_interval(now))
        self._previous = (now, reading.working_set, reading.store_bytes)
        return reading.working_set + self._growth

    def decide(self, reading: Reading, now: float) -> Action:
        wm, policy = self.watermarks, self.policy
        critical = reading.pressure >= PressureLevel.CRITICAL
        projected = self.projected(reading, now)
        if reading.pressure >= PressureLevel.MEDIUM or projected > wm.high:
            self._last_pressure = now
        if reading.pressure >= PressureLevel.LOW:
            self._last_alert = now

        if projected > wm.high or critical:
            if now - self._last_shrink < policy.cooldown:
                return None
            excess = projected - wm.low
            if reading.working_set > wm.high:
                reason = (
                    f"working set {mib(reading.working_set)} above high watermark {mib(wm.high)}"
                )
            elif projected > wm.high:
                reason = (
                    f"working set {mib(reading.working_set)} rising by "
                    f"{mib(projected - reading.working_set)} within two checks, towards the "
                    f"high watermark {mib(wm.high)}"
                )
            else:
                excess = max(excess, int(self.headroom * policy.critical_fraction))
                reason = "critical memory pressure"
            release = math.ceil(excess / self.shards)
            target = max(0, reading.store_bytes - release)
            capacity = max(policy.min_capacity, min(reading.store_capacity, target))
            self._last_shrink = self._last_alert = now
            return Shrink(target_bytes=target, capacity=capacity, reason=reason)

        calm_since = max(self._last_shrink, self._last_pressure)
        if (
            reading.store_capacity < self.max_capacity
            and now - calm_since >= policy.calm
            and now - self._last_grow >= policy.grow_every
            and reading.working_set + self.grow_step * self.shards < wm.high
        ):
            self._last_grow = now
            return Grow(capacity=min(self.max_capacity, reading.store_capacity + self.grow_step))
        return None
