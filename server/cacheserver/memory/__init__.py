"""Memory that follows the cgroup: find the limit, size the store, give memory back under
pressure (the OSv appliance's shrinker, with the container's cgroup as the guest).

    limit = detect_memory_limit()                    # cgroup v1/v2, env, or the machine
    plan = plan_memory(limit, baseline_for(...))     # capacity = limit - baseline - headroom
    shrinker = service.shrinker_for(store, limit, plan)   # then shrinker.start() in the loop

`service` holds what start-up calls (plan_for_settings, attach); the rest is pure.
"""

from __future__ import annotations

from .limits import ENV_LIMIT, MemoryLimit, detect_memory_limit
from .policy import Grow, Reading, Shrink, ShrinkController, ShrinkPolicy, Watermarks
from .pressure import PressureLevel
from .shrinker import ShrinkableStore, Shrinker, ShrinkerStats
from .sizing import Baseline, MemoryPlan, SizingError, baseline_for, default_headroom, plan_memory
from .usage import resident_bytes

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
    "ShrinkableStore",
    "Shrinker",
    "ShrinkerStats",
    "SizingError",
    "Watermarks",
    "baseline_for",
    "default_headroom",
    "detect_memory_limit",
    "plan_memory",
    "resident_bytes",
]
