"""The shrinker's decisions, fed readings: shrink to the low watermark, grow back slowly."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from cacheserver.memory import Grow, PressureLevel, Reading, Shrink, ShrinkController, ShrinkPolicy
from cacheserver.memory.policy import watermarks_for

MIB = 1 << 20
LIMIT = 256 * MIB
HEADROOM = 32 * MIB
CAPACITY = 180 * MIB
NONE = PressureLevel.NONE


def controller(shards: int = 1, **policy: float) -> ShrinkController:
    return ShrinkController(
        watermarks_for(LIMIT, HEADROOM),
        max_capacity=CAPACITY // shards,
        headroom=HEADROOM,
        policy=ShrinkPolicy(**policy),
        shards=shards,
    )


def test_watermarks_sit_around_the_planned_working_set() -> None:
    wm = watermarks_for(LIMIT, HEADROOM)
    assert (wm.high, wm.low) == (240 * MIB, 208 * MIB)
    assert wm.low < LIMIT - HEADROOM < wm.high


def test_below_high_watermark_nothing_happens() -> None:
    c = controller()
    assert c.decide(Reading(235 * MIB, NONE, CAPACITY, CAPACITY), now=0.0) is None


def test_above_high_watermark_shrinks_to_low_and_lowers_capacity() -> None:
    c = controller()
    action = c.decide(Reading(250 * MIB, NONE, 170 * MIB, CAPACITY), now=0.0)
    assert isinstance(action, Shrink)
    # 250 - 208 = 42 MiB over the low watermark, all released from the store...
    assert action.target_bytes == 170 * MIB - 42 * MIB
    # ...and the capacity follows, so the store does not refill straight away.
    assert action.capacity == action.target_bytes
    assert "above high watermark" in action.reason


def test_shards_split_the_excess() -> None:
    c = controller(shards=4)
    action = c.decide(Reading(250 * MIB, NONE, 40 * MIB, 45 * MIB), now=0.0)
    assert isinstance(action, Shrink)
    assert action.target_bytes == 40 * MIB - 42 * MIB // 4  # a quarter of 250 - 208 MiB


def test_cooldown_between_shrinks() -> None:
    c = controller(cooldown=0.5)
    assert isinstance(c.decide(Reading(250 * MIB, NONE, 170 * MIB, CAPACITY), 0.0), Shrink)
    assert c.decide(Reading(250 * MIB, NONE, 128 * MIB, 128 * MIB), 0.2) is None
    assert isinstance(c.decide(Reading(250 * MIB, NONE, 128 * MIB, 128 * MIB), 0.6), Shrink)


def test_critical_pressure_shrinks_even_below_high() -> None:
    c = controller()
    action = c.decide(Reading(200 * MIB, PressureLevel.CRITICAL, 150 * MIB, CAPACITY), 0.0)
    assert isinstance(action, Shrink)
    assert action.target_bytes == 150 * MIB - HEADROOM // 2
    assert action.reason == "critical memory pressure"


def test_low_pressure_alone_is_normal_reclaim() -> None:
    c = controller(calm=0.0, grow_every=0.0)
    action = c.decide(Reading(100 * MIB, PressureLevel.LOW, 90 * MIB, 100 * MIB), 0.0)
    assert isinstance(action, Grow)


def test_empty_store_keeps_a_minimal_capacity() -> None:
    c = controller()
    action = c.decide(Reading(255 * MIB, NONE, 0, CAPACITY), 0.0)
    assert isinstance(action, Shrink)
    assert (action.target_bytes, action.capacity) == (0, MIB)


@dataclass
class Cgroup:
    """A cgroup in miniature: the server's fixed memory, its store, and a sidecar."""

    server_baseline: int = 40 * MIB
    store_bytes: int = 0
    store_capacity: int = CAPACITY
    sidecar: int = 0

    @property
    def working_set(self) -> int:
        return self.server_baseline + self.store_bytes + self.sidecar

    def reading(self, pressure: PressureLevel = NONE) -> Reading:
        return Reading(self.working_set, pressure, self.store_bytes, self.store_capacity)

    def fill(self) -> None:
        self.store_bytes = self.store_capacity  # clients keep writing

    def apply(self, action: Shrink | Grow | None) -> None:
        if isinstance(action, Shrink):
            self.store_bytes = min(self.store_bytes, action.target_bytes)
            self.store_capacity = action.capacity
        elif isinstance(action, Grow):
            self.store_capacity = action.capacity


def test_sidecar_arrives_and_leaves_shrink_then_slow_regrowth() -> None:
    c = controller(interval=1.0, cooldown=0.5, calm=30.0, grow_every=5.0)
    wm = c.watermarks
    cg = Cgroup()
    cg.fill()
    t = 0.0
    # Full store: 40 + 180 = 220 MiB, between the watermarks: steady.
    assert c.decide(cg.reading(), t) is None

    # A sidecar grows to 100 MiB, 10 MiB per check: 320 MiB wanted of 256, an OOM kill
    # unless the store makes room.
    shrinks = []
    for _ in range(10):
        t += 1
        cg.sidecar += 10 * MIB
        action = c.decide(cg.reading(), t)
        cg.apply(action)
        shrinks += [action] if isinstance(action, Shrink) else []
        assert cg.working_set <= wm.high
        cg.fill()
    assert shrinks
    assert cg.working_set <= wm.low
    assert cg.store_bytes > 0  # room was made, the cache was not thrown away

    # Clients keep writing: the lowered capacity holds, nothing more to do.
    for _ in range(20):
        t += 1
        cg.fill()
        assert c.decide(cg.reading(), t) is None
    assert cg.working_set <= wm.low

    cg.sidecar = 0  # the sidecar exits
    shrunk = cg.store_capacity
    capacities = []
    for _ in range(200):
        t += 1
        cg.apply(c.decide(cg.reading(), t))
        cg.fill()
        capacities.append(cg.store_capacity)
    # No growth during the calm period (30 s after the last shrink)...
    assert capacities[:9] == [shrunk] * 9
    # ...then at most one step of 5% of the planned capacity every 5 s...
    steps = [b - a for a, b in itertools.pairwise(capacities) if b != a]
    assert steps and all(0 < s <= CAPACITY * 0.05 + 1 for s in steps)
    assert len(steps) <= (200 - 30) / 5 + 1
    # ...back to the planned capacity, and never past it or past the high watermark.
    assert capacities[-1] == CAPACITY
    assert max(capacities) == CAPACITY
    assert cg.working_set < wm.high


def test_growth_stops_while_something_else_holds_memory() -> None:
    c = controller(calm=0.0, grow_every=0.0)
    cg = Cgroup(store_capacity=100 * MIB, sidecar=90 * MIB)
    cg.fill()  # 40 + 100 + 90 = 230 MiB
    for t in range(50):
        cg.apply(c.decide(cg.reading(), float(t)))
        cg.fill()
    # It grew while a step fitted below the high watermark, and stopped there.
    assert cg.store_capacity > 100 * MIB
    assert cg.working_set < c.watermarks.high <= cg.working_set + c.grow_step
    assert cg.store_capacity < CAPACITY


def test_medium_pressure_restarts_the_calm_period() -> None:
    c = controller(calm=10.0, grow_every=0.0)
    low = Cgroup(store_capacity=100 * MIB)
    assert c.decide(low.reading(PressureLevel.MEDIUM), 0.0) is None
    assert c.decide(low.reading(), 9.0) is None
    assert isinstance(c.decide(low.reading(), 10.0), Grow)


def test_fast_growth_shrinks_before_the_high_watermark() -> None:
    # Two checks ahead at the alert pace (0.5 s): one second of growth is projected.
    c = controller(interval=1.0, alert_interval=0.5, cooldown=3.0)
    store = 150 * MIB
    assert c.decide(Reading(190 * MIB, NONE, store, CAPACITY), 0.0) is None
    assert c.decide(Reading(210 * MIB, NONE, store, CAPACITY), 1.0) is None  # 230 < 240
    # 20 MiB more per check: 250 MiB by the next one, above 240. Act now.
    action = c.decide(Reading(230 * MIB, NONE, store, CAPACITY), 2.0)
    assert isinstance(action, Shrink)
    assert "rising" in action.reason
    assert action.target_bytes == store - (250 - 208) * MIB


def test_store_filling_up_is_not_a_trend() -> None:
    # The store's own growth is bounded by its capacity: no pre-emptive shrink for it.
    c = controller(interval=1.0)
    assert c.decide(Reading(200 * MIB, NONE, 150 * MIB, CAPACITY), 0.0) is None
    assert c.decide(Reading(225 * MIB, NONE, 175 * MIB, CAPACITY), 1.0) is None


def test_growth_outside_the_store_raises_the_check_rate() -> None:
    c = controller(interval=0.1, alert_interval=0.02, alert_hold=1.0)
    assert c.next_interval(0.0) == 0.1
    c.decide(Reading(200 * MIB, NONE, 150 * MIB, CAPACITY), 0.0)
    c.decide(Reading(200 * MIB, NONE, 150 * MIB, CAPACITY), 0.1)
    assert c.next_interval(0.1) == 0.1  # quiet
    c.decide(Reading(203 * MIB, NONE, 150 * MIB, CAPACITY), 0.2)  # 3 MiB, not the store's
    assert c.next_interval(0.2) == 0.02
    assert c.next_interval(1.19) == 0.02
    assert c.next_interval(1.2) == 0.1  # calm again after alert_hold
