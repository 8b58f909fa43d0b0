"""Process start-up: pin, size memory, run the worker(s) on uvloop."""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable

import uvloop

from cacheserver.config import Settings
from cacheserver.cpus import format_cpu_list
from cacheserver.memory import SizingError
from cacheserver.memory.service import plan_for_settings, serve_with_shrinker
from cacheserver.memory.sizing import MemoryPlan
from cacheserver.security.credentials import CredentialsError, read_credentials
from cacheserver.security.tls import TLSError, build_context
from cacheserver.server import Worker
from cacheserver.termination import record_fatal
from cacheserver.warm import remove_stale_snapshots

log = logging.getLogger("cacheserver")


def pin_to_cpu(index: int) -> int | None:
    """Pin this process to the index-th CPU of its current affinity set; returns the CPU."""
    cpus = sorted(os.sched_getaffinity(0))
    if not cpus:
        return None
    cpu = cpus[index % len(cpus)]
    os.sched_setaffinity(0, {cpu})
    return cpu


def check_files(settings: Settings) -> str | None:
    """Why the credentials file or the certificates cannot serve, or None: checked before
    anything starts, so a bad Secret is a clear termination message, not a crash."""
    if settings.auth_file:
        try:
            read_credentials(settings.auth_file)
        except (OSError, CredentialsError) as err:
            return f"cannot use the credentials file (-Y): {err}"
    if settings.ssl_enabled:
        try:
            build_context(settings)
        except TLSError as err:
            return f"cannot use the TLS certificates (-Z): {err}"
    return None


def run(settings: Settings) -> int:
    problem = check_files(settings)
    if problem is not None:
        log.error("%s", problem)
        record_fatal(settings.termination_log, problem)
        return 2
    try:
        # Measured here, after the imports and before any item: the interpreter's baseline.
        limit, plan = plan_for_settings(settings)
    except SizingError as err:
        log.error("cannot size memory: %s", err)
        record_fatal(settings.termination_log, f"cannot size memory: {err}")
        return 2
    plan.log(log)
    budget = memory_budget(plan)
    if settings.memory_file:
        remove_stale_snapshots(settings.memory_file, settings.workers)

    async def serve(worker: Worker) -> None:
        await serve_with_shrinker(worker, limit, plan, shards=settings.workers)

    if settings.workers > 1:
        from cacheserver.supervisor import run_workers

        return run_workers(settings, plan.capacity, serve, budget)
    allowed = frozenset(os.sched_getaffinity(0))
    if settings.pin:
        cpu = pin_to_cpu(0)
        log.info("pinned to CPU %s of %s", cpu, format_cpu_list(allowed))
    try:
        uvloop.run(_serve(settings, plan.capacity, serve, budget, allowed))
    except OSError as err:
        log.error("cannot start: %s", err)
        record_fatal(settings.termination_log, f"cannot start: {err}")
        return 1
    return 0


def memory_budget(plan: MemoryPlan) -> str:
    """The memory budget a warm-restart snapshot must share with the server restoring it:
    -m, or with -m auto the limit and headroom (not the capacity: the baseline it subtracts
    is measured at each start and moves by a few pages)."""
    if plan.sizing == "fixed":
        return f"-m {plan.capacity} bytes"
    return f"auto: limit {plan.limit} bytes, headroom {plan.headroom} bytes"


async def _serve(
    settings: Settings,
    capacity: int,
    serve: Callable[[Worker], Awaitable[None]],
    budget: str,
    cpus_allowed: frozenset[int] | None = None,
) -> None:
    worker = Worker(settings, capacity=capacity, memory_budget=budget, cpus_allowed=cpus_allowed)
    log.info(
        "cacheserver pid %d: capacity %d bytes, max item %d bytes, %d connections",
        os.getpid(),
        worker.store.capacity,
        settings.max_item_size,
        settings.conn_limit,
    )
    await serve(worker)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(run(Settings()))
