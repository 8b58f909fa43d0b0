"""Memory that follows the cgroup: find the limit, size the store, give memory back under
pressure (the OSv appliance's shrinker, with the container's cgroup as the guest).

    limit = detect_memory_limit()                    # cgroup v1/v2, env, or the machine
    plan = plan_memory(limit, baseline_for(...))     # capacity = limit - baseline - headroom
    shrinker = shrinker_for(store, limit, plan)      # then shrinker.start() in the loop
"""

from __future__ import annotations

from pathlib import Path

from .limits import ENV_LIMIT, MemoryLimit, detect_memory_limit
from .policy import Grow, Reading, Shrink, ShrinkController, ShrinkPolicy, Watermarks
from .pressure import PressureLevel, watcher_for
from .shrinker import ShrinkableStore, Shrinker, ShrinkerStats
from .sizing import Baseline, MemoryPlan, SizingError, baseline_for, default_headroom, plan_memory
from .usage import monitor_for, resident_bytes

__all__ = [
    "ENV_LIMIT",
    "Baseline",
    "Grow",
    "MemoryLimit",
    "MemoryPlan",
    "PressureLevel",
    "Reading",
    "Shrink",
    "ShrinkController",
    "ShrinkPolicy",
    "Shrinker",
    "ShrinkerStats",
    "SizingError",
    "Watermarks",
    "baseline_for",
    "default_headroom",
    "detect_memory_limit",
    "plan_memory",
    "resident_bytes",
    "shrinker_for",
]


def shrinker_for(
    store: ShrinkableStore,
    limit: MemoryLimit,
    plan: MemoryPlan,
    *,
    shards: int = 1,
    policy: ShrinkPolicy | None = None,
    root: Path | str = "/",
) -> Shrinker:
    """A shrinker for one shard of the store, watching what the limit applies to."""
    watch = limit.cgroup
    if watch is None and limit.source != "meminfo":
        watch = limit.memory_cgroup
    return Shrinker(
        store,
        plan,
        monitor_for(limit, root),
        watcher_for(watch, root),
        policy=policy,
        shards=shards,
    )
