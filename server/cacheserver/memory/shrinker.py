"""The shrinker: an asyncio task that keeps the store inside the memory the cgroup allows.

It wakes every `policy.interval` seconds (more often on alert: something outside the store
growing, or pressure), and at once when the kernel signals pressure, reads
the working set, asks the ShrinkController what to do, and applies that to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .policy import Grow, Reading, Shrink, ShrinkController, ShrinkPolicy, watermarks_for
from .pressure import PressureLevel, PressureState, PressureWatcher
from .release import release_free_memory
from .sizing import MemoryPlan, mib
from .usage import UsageError, UsageMonitor, resident_bytes

log = logging.getLogger("cacheserver.memory")

# Counters of v2 memory.events and v1 memory.oom_control. An OOM means critical; hitting
# memory.high or memory.max only means reclaim (page cache filling the limit does it too).
CRITICAL_EVENTS = ("oom", "oom_kill", "under_oom")
MEDIUM_EVENTS = ("high", "max")
MIN_CHECK_GAP = 0.01  # pressure events can come in bursts; check at most this often


class ShrinkableStore(Protocol):
    """What the shrinker needs of the store (cacheserver.storage.Store)."""

    @property
    def capacity(self) -> int: ...

    @property
    def bytes_used(self) -> int: ...

    def set_capacity(self, nbytes: int) -> None: ...

    def shrink(self, target_bytes: int) -> int: ...


@dataclass
class ShrinkerStats:
    shrink_events: int = 0
    bytes_released: int = 0
    grow_events: int = 0
    checks: int = 0
    working_set: int = 0
    resident: int = 0
    pressure: PressureLevel = PressureLevel.NONE
    pressure_signals: int = 0
    read_errors: int = 0
    trims: int = 0  # times free heap pages were handed back (no item lost)
    trimmed_bytes: int = 0  # working set those hand-backs took off


class Shrinker:
    def __init__(
        self,
        store: ShrinkableStore,
        plan: MemoryPlan,
        monitor: UsageMonitor,
        watcher: PressureWatcher | None = None,
        *,
        policy: ShrinkPolicy | None = None,
        shards: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.plan = plan
        self.monitor = monitor
        self.watcher = watcher
        self.policy = policy or ShrinkPolicy()
        self.clock = clock
        self.watermarks = watermarks_for(plan.limit, plan.headroom)
        self.controller = ShrinkController(
            self.watermarks,
            max_capacity=plan.capacity // shards,
            headroom=plan.headroom,
            policy=self.policy,
            shards=shards,
        )
        self.pressure = PressureState()
        self.stats = ShrinkerStats()
        self.notifications = "none"
        self._events: dict[str, int] | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._warned_read = False
        self._last_trim = -math.inf

    # -- one evaluation ------------------------------------------------------------------

    def _note_events(self, now: float) -> None:
        """Turn increases of the kernel's limit-hit counters into pressure signals."""
        events = self.monitor.events()
        previous, self._events = self._events, events
        if previous is None:
            return
        for name in CRITICAL_EVENTS:
            if events.get(name, 0) > previous.get(name, 0) or (
                name == "under_oom" and events.get(name, 0)
            ):
                self.pressure.signal(PressureLevel.CRITICAL, now)
        for name in MEDIUM_EVENTS:
            if events.get(name, 0) > previous.get(name, 0):
                self.pressure.signal(PressureLevel.MEDIUM, now)

    def _trimmed(self, working_set: int, now: float) -> int:
        """Above the low watermark, first hand the allocator's free pages back: evicting
        and refilling leaves tens of MiB free inside the heap, still counted as used.
        Close to the high watermark, do it before every decision that could evict."""
        wm = self.watermarks
        near_high = working_set > wm.high - (wm.high - wm.low) // 4
        every = self.policy.cooldown if near_high else self.policy.trim_every
        if working_set <= wm.low or now - self._last_trim < every:
            return working_set
        self._last_trim = now
        if not release_free_memory():
            return working_set
        after = self.monitor.working_set()
        self.stats.trims += 1
        self.stats.trimmed_bytes += max(0, working_set - after)
        return after

    def check(self) -> Shrink | Grow | None:
        """Read, decide, act. Returns the action taken (None: nothing to do)."""
        now = self.clock()
        self.stats.checks += 1
        try:
            working_set = self._trimmed(self.monitor.working_set(), now)
            self._note_events(now)
        except UsageError as exc:
            self.stats.read_errors += 1
            if not self._warned_read:
                log.warning("memory: %s; the shrinker cannot see memory use", exc)
                self._warned_read = True
            return None
        level = self.pressure.level(now)
        self.stats.working_set, self.stats.pressure = working_set, level
        with contextlib.suppress(UsageError):
            self.stats.resident = resident_bytes()
        reading = Reading(working_set, level, self.store.bytes_used, self.store.capacity)
        action = self.controller.decide(reading, now)
        if isinstance(action, Shrink):
            self._shrink(action, reading)
        elif isinstance(action, Grow):
            self.store.set_capacity(action.capacity)
            self.stats.grow_events += 1
            log.info(
                "memory: calm for %.0f s, capacity %s -> %s",
                self.policy.calm,
                mib(reading.store_capacity),
                mib(action.capacity),
            )
        return action

    def _shrink(self, action: Shrink, reading: Reading) -> None:
        released = self.store.shrink(action.target_bytes)
        self.store.set_capacity(action.capacity)
        release_free_memory()
        self.stats.shrink_events += 1
        self.stats.bytes_released += released
        log.warning(
            "memory: %s (limit %s, pressure %s): released %s, capacity %s -> %s",
            action.reason,
            mib(self.plan.limit),
            reading.pressure.label,
            mib(released),
            mib(reading.store_capacity),
            mib(action.capacity),
        )

    # -- the task ------------------------------------------------------------------------

    def _on_pressure(self, level: PressureLevel) -> None:
        self.pressure.signal(level, self.clock())
        self.stats.pressure_signals += 1
        self._wake.set()

    def start(self) -> asyncio.Task[None]:
        """Register for pressure notifications (where the kernel lets us) and start checking."""
        loop = asyncio.get_running_loop()
        if self.watcher is not None:
            try:
                self.watcher.start(loop, self._on_pressure)
                self.notifications = self.watcher.description
            except OSError as exc:
                # Routine in a container (read-only cgroupfs): the periodic check suffices.
                log.info(
                    "memory: no pressure notifications from %s (%s); checking every %g s only",
                    self.watcher.description,
                    exc.strerror or exc,
                    self.policy.interval,
                )
                self.watcher = None
        log.info(
            "memory: shrinker watching %s: high watermark %s, low %s; notifications: %s",
            self.monitor.source,
            mib(self.watermarks.high),
            mib(self.watermarks.low),
            self.notifications,
        )
        self.check()  # so that stats have readings from the start
        self._task = loop.create_task(self._run(), name="memory-shrinker")
        return self._task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    self._wake.wait(), self.controller.next_interval(self.clock())
                )
            self._wake.clear()
            try:
                self.check()
            except Exception:
                # The shrinker must outlive a bad reading or a store error: log and go on.
                log.exception("memory: shrinker check failed")
            await asyncio.sleep(MIN_CHECK_GAP)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.watcher is not None:
            self.watcher.close()

    # -- reporting -----------------------------------------------------------------------

    def resident(self) -> int:
        """This process's resident memory now (0 where /proc cannot tell)."""
        try:
            return resident_bytes()
        except UsageError:
            return 0

    def current_pressure(self) -> PressureLevel:
        return self.pressure.level(self.clock())

    def stats_fields(self) -> list[tuple[str, int | str]]:
        """Name/value pairs for `stats` (capacity and bytes used are memcached's own
        limit_maxbytes and bytes; evictions by cause are evictions_capacity/_shrinker)."""
        s = self.stats
        return [
            ("memory_limit", self.plan.limit),
            ("memory_limit_source", self.plan.limit_source),
            ("memory_working_set", s.working_set),
            ("memory_resident", self.resident()),
            ("memory_high_watermark", self.watermarks.high),
            ("memory_low_watermark", self.watermarks.low),
            ("memory_pressure", self.current_pressure().label),
            ("memory_shrink_events", s.shrink_events),
            ("memory_bytes_released", s.bytes_released),
            ("memory_grow_events", s.grow_events),
            ("memory_trims", s.trims),
            ("memory_trimmed_bytes", s.trimmed_bytes),
        ]
