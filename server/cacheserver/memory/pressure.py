"""Kernel notifications that memory is running low, delivered into the event loop.

cgroup v2 (and the machine as a whole): PSI triggers on memory.pressure, which wake a poller
with POLLPRI when tasks stalled on memory longer than a threshold within a window.
cgroup v1: memory.pressure_level events registered through cgroup.event_control, each
signalling an eventfd. Either may be refused (read-only cgroupfs in a container, no
privilege, old kernel): the shrinker then relies on its periodic working-set check alone.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from .cgroupfs import CgroupDir


class PressureLevel(IntEnum):
    NONE = 0
    LOW = 1  # the kernel reclaims: normal when page cache fills the limit
    MEDIUM = 2  # reclaim works hard, active caches go
    CRITICAL = 3  # about to run out: an OOM kill is near

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass
class PressureState:
    """The current pressure level: the highest one signalled within the last `hold` seconds."""

    hold_seconds: float = 2.0
    signals: dict[PressureLevel, int] = field(default_factory=dict)
    _last: dict[PressureLevel, float] = field(default_factory=dict)

    def signal(self, level: PressureLevel, now: float) -> None:
        if level is PressureLevel.NONE:
            return
        self._last[level] = now
        self.signals[level] = self.signals.get(level, 0) + 1

    def level(self, now: float) -> PressureLevel:
        recent = [lvl for lvl, t in self._last.items() if now - t <= self.hold_seconds]
        return max(recent, default=PressureLevel.NONE)


OnPressure = Callable[[PressureLevel], None]


class PressureWatcher:
    """Base: registers with the kernel in `start`, calls `on_pressure` from the event loop."""

    description = ""

    def start(self, loop: asyncio.AbstractEventLoop, on_pressure: OnPressure) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class V1PressureLevels(PressureWatcher):
    """One eventfd per level on a cgroup v1 memory.pressure_level file."""

    LEVELS = (PressureLevel.LOW, PressureLevel.MEDIUM, PressureLevel.CRITICAL)

    def __init__(self, cgroup: CgroupDir) -> None:
        self.cgroup = cgroup
        self.description = f"cgroup1 {cgroup.show('memory.pressure_level')} events"
        self._fds: list[int] = []
        self._readers: list[int] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop, on_pressure: OnPressure) -> None:
        self._loop = loop
        try:
            level_fd = os.open(self.cgroup.file("memory.pressure_level"), os.O_RDONLY)
            self._fds.append(level_fd)
            control_fd = os.open(self.cgroup.file("cgroup.event_control"), os.O_WRONLY)
            self._fds.append(control_fd)
            for level in self.LEVELS:
                efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                self._fds.append(efd)
                os.write(control_fd, f"{efd} {level_fd} {level.label}".encode())
                loop.add_reader(efd, self._drain, efd, level, on_pressure)
                self._readers.append(efd)
        except OSError:
            self.close()
            raise

    @staticmethod
    def _drain(efd: int, level: PressureLevel, on_pressure: OnPressure) -> None:
        try:
            os.eventfd_read(efd)
        except BlockingIOError:
            return
        on_pressure(level)

    def close(self) -> None:
        if self._loop is not None:
            for fd in self._readers:
                self._loop.remove_reader(fd)
        self._readers.clear()
        # Closing the eventfds unregisters the events in the kernel.
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()


# (level, stall threshold µs, window µs). The kernel lets callers without CAP_SYS_RESOURCE use
# windows in multiples of 2 s only, so each trigger has a privileged and an unprivileged form.
PSI_TRIGGERS = (
    (PressureLevel.MEDIUM, "some", 150_000, 1_000_000),
    (PressureLevel.CRITICAL, "full", 100_000, 1_000_000),
)


class PsiTriggers(PressureWatcher):
    """PSI triggers on a memory.pressure file (a cgroup2 directory, or /proc/pressure)."""

    def __init__(self, path: Path, shown: str) -> None:
        self.path = path
        self.description = f"PSI triggers on {shown}"
        self._epoll: select.epoll | None = None
        self._levels: dict[int, PressureLevel] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _open_trigger(self, kind: str, stall_us: int, window_us: int) -> int:
        for stall, window in ((stall_us, window_us), (stall_us * 2, 2_000_000)):
            fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                os.write(fd, f"{kind} {stall} {window}".encode())
                return fd
            except OSError as exc:
                os.close(fd)
                if exc.errno != errno.EINVAL or window == 2_000_000:
                    raise
        raise AssertionError("unreachable")

    def start(self, loop: asyncio.AbstractEventLoop, on_pressure: OnPressure) -> None:
        self._loop = loop
        # PSI fds always poll readable; only POLLPRI means "fired". An epoll set that waits
        # for POLLPRI alone is itself readable exactly when a trigger fired.
        self._epoll = select.epoll()
        try:
            for level, kind, stall, window in PSI_TRIGGERS:
                fd = self._open_trigger(kind, stall, window)
                self._levels[fd] = level
                self._epoll.register(fd, select.EPOLLPRI)
            loop.add_reader(self._epoll.fileno(), self._drain, on_pressure)
        except OSError:
            self.close()
            raise

    def _drain(self, on_pressure: OnPressure) -> None:
        assert self._epoll is not None
        for fd, events in self._epoll.poll(0):
            if events & select.EPOLLERR:
                # The cgroup went away; nothing more will come from this trigger.
                self._epoll.unregister(fd)
                continue
            on_pressure(self._levels[fd])

    def close(self) -> None:
        if self._epoll is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None
        for fd in self._levels:
            os.close(fd)
        self._levels.clear()


def watcher_for(cgroup: CgroupDir | None, root: Path | str = "/") -> PressureWatcher:
    """The kernel's pressure notifications for the memory the limit applies to."""
    if cgroup is None:
        return PsiTriggers(Path(root) / "proc/pressure/memory", "/proc/pressure/memory")
    if cgroup.version == 1:
        return V1PressureLevels(cgroup)
    return PsiTriggers(cgroup.file("memory.pressure"), cgroup.show("memory.pressure"))
