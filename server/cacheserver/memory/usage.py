"""How much memory is in use right now, measured the way the kernel (and the kubelet) judge it.

The working set is usage minus the inactive file cache: clean page cache the kernel drops
before it would kill anyone, so it does not count against us.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .cgroupfs import CgroupDir
from .limits import MemoryLimit, read_key_values

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class UsageError(Exception):
    """A usage file could not be read; the message names it."""


def resident_bytes(root: Path | str = "/", pid: int | str = "self") -> int:
    """Resident memory of a process, from /proc/PID/statm (second field, in pages)."""
    name = f"/proc/{pid}/statm"
    try:
        fields = (Path(root) / name.lstrip("/")).read_text().split()
        return int(fields[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError) as exc:
        raise UsageError(f"cannot read resident memory from {name}: {exc}") from None


class UsageMonitor(Protocol):
    """Reads the memory in use that counts against the limit."""

    source: str

    def working_set(self) -> int: ...

    def events(self) -> dict[str, int]:
        """Cumulative kernel event counters (v2 memory.events); empty where there are none."""
        ...


def _read_int(path: Path, shown: str) -> int:
    try:
        return int(path.read_text().split()[0])
    except (OSError, IndexError, ValueError) as exc:
        raise UsageError(f"cannot read {shown}: {exc}") from None


def _stat(path: Path, shown: str) -> dict[str, int]:
    problems: list[str] = []
    values = read_key_values(path, shown, problems)
    if not values and problems:
        raise UsageError(problems[0])
    return values


@dataclass
class CgroupV1Usage:
    """usage_in_bytes - total_inactive_file, as the kubelet computes it on cgroup v1."""

    cgroup: CgroupDir
    source: str = field(init=False)

    def __post_init__(self) -> None:
        self.source = f"cgroup1:{self.cgroup.show('memory.usage_in_bytes')}"

    def working_set(self) -> int:
        cg = self.cgroup
        usage = _read_int(cg.file("memory.usage_in_bytes"), cg.show("memory.usage_in_bytes"))
        stat = _stat(cg.file("memory.stat"), cg.show("memory.stat"))
        return max(0, usage - stat.get("total_inactive_file", 0))

    def events(self) -> dict[str, int]:
        cg = self.cgroup
        # memory.oom_control has "oom_kill N" on kernels since 4.13.
        try:
            return _stat(cg.file("memory.oom_control"), cg.show("memory.oom_control"))
        except UsageError:
            return {}


@dataclass
class CgroupV2Usage:
    """memory.current - inactive_file, as the kubelet computes it on cgroup v2."""

    cgroup: CgroupDir
    source: str = field(init=False)

    def __post_init__(self) -> None:
        self.source = f"cgroup2:{self.cgroup.show('memory.current')}"

    def working_set(self) -> int:
        cg = self.cgroup
        usage = _read_int(cg.file("memory.current"), cg.show("memory.current"))
        stat = _stat(cg.file("memory.stat"), cg.show("memory.stat"))
        return max(0, usage - stat.get("inactive_file", 0))

    def events(self) -> dict[str, int]:
        cg = self.cgroup
        try:
            return _stat(cg.file("memory.events"), cg.show("memory.events"))
        except UsageError:
            return {}


@dataclass
class MachineUsage:
    """MemTotal - MemAvailable: the machine's memory in use, when there is no cgroup limit."""

    root: Path = Path("/")
    source: str = "meminfo"

    def working_set(self) -> int:
        info = _stat(self.root / "proc/meminfo", "/proc/meminfo")
        try:
            return max(0, (info["MemTotal"] - info["MemAvailable"]) * 1024)
        except KeyError as exc:
            raise UsageError(f"/proc/meminfo has no {exc.args[0]} line") from None

    def events(self) -> dict[str, int]:
        return {}


@dataclass
class ProcessUsage:
    """This process's resident memory: all there is when only the env gave a limit."""

    root: Path = Path("/")
    source: str = "/proc/self/statm"

    def working_set(self) -> int:
        return resident_bytes(self.root)

    def events(self) -> dict[str, int]:
        return {}


def monitor_for(limit: MemoryLimit, root: Path | str = "/") -> UsageMonitor:
    """The usage the limit applies to: the limiting cgroup's, the machine's, or our own.

    A limit from the environment that is tighter than any cgroup's was set for this server
    alone, so its own resident memory is what counts against it.
    """
    root = Path(root)
    if limit.cgroup is not None:
        cgroup = limit.cgroup
        return CgroupV1Usage(cgroup) if cgroup.version == 1 else CgroupV2Usage(cgroup)
    if limit.source == "meminfo":
        return MachineUsage(root)
    return ProcessUsage(root)
