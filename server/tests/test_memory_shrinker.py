"""The shrinker component: reads real usage files (a fixture cgroup), acts on the real store."""

from __future__ import annotations

import asyncio
import logging
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
from cacheserver.storage import Outcome, Store
from cacheserver.storage.item import item_cost, make_item

MIB = 1 << 20
LIMIT = 256 * MIB


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


VALUE = b"v" * (64 * 1024)
ITEM_COST = item_cost(b"key:0000000", make_item(0, 0, 0, VALUE))


def filled_store(capacity: int) -> Store:
    """The real store, filled with 64 KiB values up to its capacity."""
    store = Store(capacity)
    for n in range(capacity // ITEM_COST):
        assert store.set(b"key:%07d" % n, 0, 0, VALUE) is Outcome.STORED
    assert store.stats.evictions == 0
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
    assert excess <= released < excess + ITEM_COST
    assert store.capacity == action.capacity <= store.bytes_used + ITEM_COST
    assert store.stats.evictions_shrinker == released // ITEM_COST
    assert store.stats.evictions == 0  # none counted as capacity evictions
    assert store.get(b"key:0000000") is None  # the least recently used went first
    assert store.get(b"key:%07d" % (p.capacity // ITEM_COST - 1)) is not None
    assert (shrinker.stats.shrink_events, shrinker.stats.bytes_released) == (1, released)
    assert "above high watermark" in caplog.text and "released" in caplog.text


def test_nothing_happens_between_the_watermarks(tmp_path: Path) -> None:
    p = plan()
    store = filled_store(p.capacity)
    shrinker = Shrinker(store, p, CgroupV2Usage(v2_cgroup(tmp_path, current=225 * MIB)))
    assert shrinker.check() is None
    assert store.bytes_used == p.capacity // ITEM_COST * ITEM_COST


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


def test_free_heap_is_handed_back_before_anything_is_evicted(tmp_path: Path) -> None:
    now = [0.0]
    p = plan()
    store = filled_store(p.capacity)
    cg = v2_cgroup(tmp_path, current=200 * MIB)
    shrinker = Shrinker(store, p, CgroupV2Usage(cg), clock=lambda: now[0])
    shrinker.check()
    assert shrinker.stats.trims == 0  # below the low watermark (208 MiB): nothing to do
    v2_cgroup(tmp_path, current=220 * MIB)
    shrinker.check()
    assert shrinker.stats.trims == 1
    now[0] += 0.5
    shrinker.check()
    assert shrinker.stats.trims == 1  # at most once a second in the comfortable zone...
    v2_cgroup(tmp_path, current=236 * MIB)
    shrinker.check()
    assert shrinker.stats.trims == 2  # ...but before every decision close to the high one
    assert store.stats.evictions_shrinker == 0
