"""The calls start-up makes: size the store from the settings, then attach the shrinker to a
worker (its store and its `stats` answers, which its /metrics exports: metrics/table.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from cacheserver.config import Settings
from cacheserver.memory.limits import MemoryLimit, detect_memory_limit
from cacheserver.memory.policy import ShrinkPolicy
from cacheserver.memory.pressure import watcher_for
from cacheserver.memory.shrinker import ShrinkableStore, Shrinker
from cacheserver.memory.sizing import MemoryPlan, baseline_for, plan_memory
from cacheserver.memory.usage import monitor_for, resident_bytes


def plan_for_settings(
    settings: Settings, root: Path | str = "/", env: Mapping[str, str] | None = None
) -> tuple[MemoryLimit, MemoryPlan]:
    """Detect the limit and size the store; call it after imports, before serving, so the
    resident size measured is the interpreter's baseline. Raises SizingError."""
    limit = detect_memory_limit(root, env)
    # With -t N a supervisor process runs next to the N workers (forked: an overestimate).
    processes = settings.workers + 1 if settings.workers > 1 else 1
    baseline = baseline_for(
        resident_bytes(root), settings.conn_limit, settings.max_item_size, processes
    )
    plan = plan_memory(
        limit,
        baseline,
        headroom_mb=settings.memory_headroom_mb,
        memory_mb=settings.memory_limit_mb,
    )
    return limit, plan


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
    return Shrinker(
        store,
        plan,
        monitor_for(limit, root),
        watcher_for(limit.cgroup, root),
        policy=policy,
        shards=shards,
    )


class _Worker(Protocol):
    """What attach() needs of cacheserver.server.Worker."""

    store: Any
    report: Any
    memlimit_listeners: list[Callable[[int], None]]


def attach(worker: _Worker, limit: MemoryLimit, plan: MemoryPlan, shards: int = 1) -> Shrinker:
    """A shrinker for the worker's store, reported in its `stats` and `stats settings` (and
    so in /metrics). Start it with `shrinker.start()` inside the worker's event loop."""
    shrinker = shrinker_for(worker.store, limit, plan, shards=shards)
    worker.report.extra_settings.append(plan.settings)
    worker.report.extra_general.append(shrinker.stats_fields)
    # cache_memlimit sets the capacity the shrinker grows back to after pressure.
    worker.memlimit_listeners.append(shrinker.controller.set_max_capacity)
    return shrinker


async def serve_with_shrinker(
    worker: Any, limit: MemoryLimit, plan: MemoryPlan, shards: int = 1
) -> None:
    """Run a worker (cacheserver.server.Worker) until it stops, its shrinker alongside."""
    shrinker = attach(worker, limit, plan, shards=shards)
    running = asyncio.ensure_future(worker.run_until_stopped())
    # One loop step lets the worker bind its ports first: with -t N, worker i must take
    # port+i before anything else on the machine can.
    await asyncio.sleep(0)
    shrinker.start()
    try:
        await running
    finally:
        await shrinker.stop()
