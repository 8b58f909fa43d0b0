"""Sizing: capacity = limit - baseline - headroom, every number with its origin."""

from __future__ import annotations

import pytest

from cacheserver.memory import MemoryLimit, SizingError, baseline_for, plan_memory
from cacheserver.memory.sizing import CONNECTION_BYTES, IN_FLIGHT_ITEMS

MIB = 1 << 20
GIB = 1 << 30


def limit(nbytes: int, source: str = "cgroup2:/sys/fs/cgroup/memory.max") -> MemoryLimit:
    return MemoryLimit(nbytes, source)


def test_baseline_adds_interpreter_connections_and_in_flight_items() -> None:
    b = baseline_for(resident_bytes=30 * MIB, conn_limit=1024, max_item_size=MIB, workers=2)
    assert b.resident == 60 * MIB  # every worker is its own interpreter
    assert b.connections == 1024 * CONNECTION_BYTES
    assert b.buffers == 2 * IN_FLIGHT_ITEMS * MIB
    assert b.total == b.resident + b.connections + b.buffers


def test_auto_capacity_in_a_256_mib_container() -> None:
    baseline = baseline_for(30 * MIB, conn_limit=1024, max_item_size=MIB)
    plan = plan_memory(limit(256 * MIB), baseline)
    assert plan.headroom == 32 * MIB  # the floor: 10% would be 25.6 MiB
    assert plan.capacity == 256 * MIB - baseline.total - 32 * MIB
    assert plan.sizing == "auto"
    # memcached -m 256 in the same container is OOM-killed; we leave room for the rest.
    assert plan.capacity < 200 * MIB


def test_default_headroom_is_a_tenth_of_large_limits() -> None:
    plan = plan_memory(limit(8 * GIB), baseline_for(30 * MIB, 1024, MIB))
    assert plan.headroom == int(8 * GIB * 0.10)
    assert "10% of the limit" in plan.headroom_source


@pytest.mark.parametrize(
    ("limit_mib", "headroom_mib"),
    [(64, 16), (96, 24), (128, 32), (256, 32), (320, 32), (1024, 102.4)],
)
def test_default_headroom_shrinks_to_a_quarter_of_small_limits(limit_mib, headroom_mib) -> None:
    # 32 MiB would leave nothing for items in 64 MiB (memcached's default size); from 128 MiB
    # up the 32 MiB floor holds, and 10% takes over above 320 MiB.
    plan = plan_memory(limit(limit_mib * MIB), baseline_for(29 * MIB, 1024, MIB))
    assert plan.headroom == int(headroom_mib * MIB)


def test_a_64_mib_container_gets_a_small_cache_instead_of_no_start() -> None:
    baseline = baseline_for(29 * MIB, conn_limit=1024, max_item_size=MIB)  # as measured
    plan = plan_memory(limit(64 * MIB), baseline)
    assert plan.capacity == 64 * MIB - baseline.total - 16 * MIB
    assert 5 * MIB < plan.capacity < 10 * MIB


def test_explicit_headroom() -> None:
    baseline = baseline_for(30 * MIB, 0, 0)
    plan = plan_memory(limit(512 * MIB), baseline, headroom_mb=100)
    assert plan.headroom == 100 * MIB
    assert plan.capacity == 512 * MIB - 30 * MIB - 100 * MIB
    assert plan.headroom_source == "--memory-headroom"


def test_settings_pairs_for_stats_settings() -> None:
    plan = plan_memory(limit(256 * MIB, "env"), baseline_for(20 * MIB, 10, 1000))
    settings = dict(plan.settings())
    assert settings == {
        "memory_sizing": "auto",
        "memory_limit": 256 * MIB,
        "memory_limit_source": "env",
        "memory_capacity": plan.capacity,
        "memory_headroom": 32 * MIB,
        "memory_baseline": plan.baseline.total,
    }


def test_log_lines_say_where_each_number_comes_from() -> None:
    src = "cgroup1:/sys/fs/cgroup/memory/x/memory.limit_in_bytes"
    plan = plan_memory(limit(256 * MIB, src), baseline_for(20 * MIB, 1024, MIB))
    text = "\n".join(plan.describe())
    assert f"memory limit 256.0 MiB from {src}" in text
    assert "resident at start 20.0 MiB" in text
    assert "memory headroom 32.0 MiB from default" in text
    assert f"memory capacity {plan.capacity / MIB:.1f} MiB (auto)" in text


def test_fixed_size_that_does_not_fit_warns() -> None:
    plan = plan_memory(limit(256 * MIB), baseline_for(30 * MIB, 1024, MIB), memory_mb=256)
    assert (plan.capacity, plan.sizing) == (256 * MIB, "fixed")
    assert any("-m 256 MB does not fit" in w for w in plan.warnings)


def test_fixed_size_that_fits_is_quiet() -> None:
    plan = plan_memory(limit(GIB), baseline_for(30 * MIB, 1024, MIB), memory_mb=64)
    assert plan.capacity == 64 * MIB and plan.warnings == ()


def test_limit_too_small_is_a_clear_error() -> None:
    with pytest.raises(SizingError, match=r"memory limit 48.0 MiB .* lower --memory-headroom"):
        plan_memory(limit(48 * MIB), baseline_for(30 * MIB, 1024, MIB))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"headroom_mb": -1}, "--memory-headroom"), ({"memory_mb": 0}, "-m/--memory-limit")],
)
def test_bad_numbers_name_the_flag(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(SizingError, match=message):
        plan_memory(limit(GIB), baseline_for(30 * MIB, 0, 0), **kwargs)


def test_limit_warnings_carry_into_the_plan() -> None:
    lim = MemoryLimit(GIB, "meminfo", warnings=("cannot read /proc/self/cgroup",))
    plan = plan_memory(lim, baseline_for(30 * MIB, 0, 0))
    assert plan.warnings == ("cannot read /proc/self/cgroup",)
