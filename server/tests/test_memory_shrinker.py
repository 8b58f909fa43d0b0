"""The shrinker component: reads real usage files (a fixture cgroup), acts on a store."""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from pathlib import Path

import pytest
from cacheserver.memory import (
    MemoryLimit,
    PressureLevel,
    Shrink,
    Shrinker,
    ShrinkPolicy,
    baseline_for,
    plan_memory,
)
from cacheserver.memory.cgroupfs import CgroupDir
from cacheserver.memory.pressure import V1PressureLevels
from cacheserver.memory.usage import CgroupV1Usage, CgroupV2Usage

MIB = 1 << 20
LIMIT = 256 * MIB


class LruStore:
    """The store contract the shrinker relies on (capacity, bytes_used, set_capacity, shrink)
    over an LRU of fixed-size items."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[int, int] = OrderedDict()
        self.bytes_used = 0
        self.evictions = 0
        self.evictions_shrinker = 0

    def set(self, key: int, size: int) -> None:
        self.items[key] = size
        self.bytes_used += size
        while self.bytes_used > self.capacity:
            self._evict()
            self.evictions += 1

    def _evict(self) -> int:
        _, size = self.items.popitem(last=False)
        self.bytes_used -= size
        return size

    def set_capacity(self, nbytes: int) -> None:
        self.capacity = nbytes
        while self.bytes_used > nbytes:
            self._evict()
            self.evictions += 1

    def shrink(self, target_bytes: int) -> int:
        released = 0
        while self.bytes_used > target_bytes:
            released += self._evict()
            self.evictions_shrinker += 1
        return released


def v2_cgroup(tmp_path: Path, current: int, inactive_file: int = 0, oom_kill: int = 0) -> CgroupDir:
    path = tmp_path / "sys/fs/cgroup/pod"
    path.mkdir(parents=True, exist_ok=True)
    (path / "memory.current").write_text(f"{current}\n")
    (path / "memory.stat").write_text(f"anon {current}\ninactive_file {inactive_file}\n")
    (path / "memory.events").write_text(f"low 0\nhigh 0\nmax 3\noom 0\noom_kill {oom_kill}\n")
    return CgroupDir(2, path, tmp_path / "sys/fs/cgroup", tmp_path)


def plan(capacity_mb: float | None = None):
    limit = MemoryLimit(LIMIT, "cgroup2:/sys/fs/cgroup/pod/memory.max")
    return plan_memory(limit, baseline_for(30 * MIB, 0, 0), memory_mb=capacity_mb)


def filled_store(capacity: int, item: int = 64 * 1024) -> LruStore:
    store = LruStore(capacity)
    for key in range(capacity // item):
        store.set(key, item)
    return store


def test_v2_working_set_excludes_inactive_file_cache(tmp_path: Path) -> None:
    cg = v2_cgroup(tmp_path, current=250 * MIB, inactive_file=60 * MIB)
    assert CgroupV2Usage(cg).working_set() == 190 * MIB


def test_v1_working_set_excludes_inactive_file_cache(tmp_path: Path) -> None:
    path = tmp_path / "memory/x"
    path.mkdir(parents=True)
    (path / "memory.usage_in_bytes").write_text(f"{300 * MIB}\n")
    (path / "memory.stat").write_text(
        f"inactive_file 1\ntotal_inactive_file {100 * MIB}\ntotal_rss {200 * MIB}\n"
    )
    assert CgroupV1Usage(CgroupDir(1, path, tmp_path / "memory", tmp_path)).working_set() == (
        200 * MIB
    )


def test_check_shrinks_the_store_to_the_low_watermark(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = plan()
    store = filled_store(p.capacity)
    cg = v2_cgroup(tmp_path, current=250 * MIB)
    shrinker = Shrinker(store, p, CgroupV2Usage(cg))
    before = store.bytes_used
    with caplog.at_level(logging.WARNING, "cacheserver.memory"):
        action = shrinker.check()
    assert isinstance(action, Shrink)
    excess = 250 * MIB - shrinker.watermarks.low
    released = before - store.bytes_used
    assert excess <= released < excess + 64 * 1024
    assert store.capacity == action.capacity <= store.bytes_used + 64 * 1024
    assert store.evictions_shrinker == released // (64 * 1024) and store.evictions == 0
    assert (shrinker.stats.shrink_events, shrinker.stats.bytes_released) == (1, released)
    assert "above high watermark" in caplog.text and "released" in caplog.text


def test_nothing_happens_between_the_watermarks(tmp_path: Path) -> None:
    p = plan()
    store = filled_store(p.capacity)
    shrinker = Shrinker(store, p, CgroupV2Usage(v2_cgroup(tmp_path, current=225 * MIB)))
    assert shrinker.check() is None
    assert store.bytes_used == p.capacity // (64 * 1024) * 64 * 1024


def test_an_oom_kill_in_the_cgroup_counts_as_critical(tmp_path: Path) -> None:
    p = plan()
    store = filled_store(p.capacity)
    shrinker = Shrinker(store, p, CgroupV2Usage(v2_cgroup(tmp_path, current=200 * MIB)))
    assert shrinker.check() is None  # first reading: the counters' starting point
    v2_cgroup(tmp_path, current=200 * MIB, oom_kill=1)  # a sidecar was killed
    action = shrinker.check()
    assert isinstance(action, Shrink) and action.reason == "critical memory pressure"
    assert shrinker.stats.pressure is PressureLevel.CRITICAL


def test_stats_fields(tmp_path: Path) -> None:
    p = plan()
    store = filled_store(p.capacity)
    shrinker = Shrinker(store, p, CgroupV2Usage(v2_cgroup(tmp_path, current=250 * MIB)))
    shrinker.check()
    fields = dict(shrinker.stats_fields())
    assert fields["memory_limit"] == LIMIT
    assert fields["memory_limit_source"] == "cgroup2:/sys/fs/cgroup/pod/memory.max"
    assert fields["memory_capacity"] == store.capacity
    assert fields["memory_bytes_used"] == store.bytes_used
    assert fields["memory_working_set"] == 250 * MIB
    assert fields["memory_shrink_events"] == 1
    assert fields["memory_bytes_released"] > 0
    assert fields["memory_resident"] > 0  # this test process, from /proc/self/statm
    assert fields["memory_pressure"] == "none"


def test_unreadable_usage_is_reported_once_and_survived(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cg = CgroupDir(2, tmp_path / "gone", tmp_path, tmp_path)
    shrinker = Shrinker(filled_store(10 * MIB), plan(10), CgroupV2Usage(cg))
    with caplog.at_level(logging.WARNING, "cacheserver.memory"):
        assert shrinker.check() is None
        assert shrinker.check() is None
    assert shrinker.stats.read_errors == 2
    assert caplog.text.count("cannot read /gone/memory.current") == 1


def test_runs_by_polling_when_pressure_notifications_are_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A cgroup directory without memory.pressure_level (as in a container whose cgroupfs
    # hides it): registering fails for real, and the periodic check must carry on alone.
    cg = v2_cgroup(tmp_path, current=200 * MIB)
    p = plan()
    store = filled_store(p.capacity)
    watcher = V1PressureLevels(CgroupDir(1, cg.path, cg.mount, tmp_path))
    shrinker = Shrinker(
        store, p, CgroupV2Usage(cg), watcher, policy=ShrinkPolicy(interval=0.05, cooldown=0.0)
    )

    async def scenario() -> None:
        with caplog.at_level(logging.INFO, "cacheserver.memory"):
            shrinker.start()
            await asyncio.sleep(0.2)
            assert shrinker.stats.shrink_events == 0
            v2_cgroup(tmp_path, current=300 * MIB)
            for _ in range(40):
                await asyncio.sleep(0.05)
                if shrinker.stats.shrink_events:
                    break
            await shrinker.stop()

    asyncio.run(scenario())
    assert shrinker.stats.shrink_events >= 1
    assert shrinker.stats.checks >= 2  # it kept checking after the refusal
    assert "no pressure notifications" in caplog.text
    assert "memory.pressure_level" in caplog.text
