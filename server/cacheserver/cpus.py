"""Which CPUs this process got, reported as the kernel writes CPU sets ("0-2,5").

`--pin` binds each worker to one CPU of the set the process was started with (its
container's cpuset). `stats settings` reports all three sets, so whoever deployed the
server can see what pinning really achieved without access to the node:

    cpus          the CPUs this worker may run on now (one CPU when pinned)
    cpus_allowed  the CPUs the process was allowed at start (the container's cpuset)
    cpus_online   every online CPU of the machine (/sys/devices/system/cpu/online)

A container whose allowed set is all of the machine's CPUs shares them with everything
else on the node; the kubelet's static CPU manager gives a Guaranteed pod with whole CPUs
a set of its own instead. The operator compares the three (see docs/operator.md).

The list format is the one of cpuset.cpus and /sys/devices/system/cpu/online; the operator
parses what the server writes with the same two functions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

ONLINE = "sys/devices/system/cpu/online"


def format_cpu_list(cpus: Iterable[int]) -> str:
    """CPU numbers as a list of ranges: {0, 1, 2, 5} -> "0-2,5"; empty -> ""."""
    ordered = sorted(set(cpus))
    parts: list[str] = []
    start = prev = None
    for cpu in ordered:
        if prev is not None and cpu == prev + 1:
            prev = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = cpu
    if start is not None:
        parts.append(str(start) if start == prev else f"{start}-{prev}")
    return ",".join(parts)


def parse_cpu_list(text: str) -> frozenset[int]:
    """The inverse of format_cpu_list; raises ValueError naming the bad part."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"not a CPU list: {text.strip()!r} (bad part {part!r})")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"not a CPU list: {text.strip()!r} ({part!r} runs backwards)")
        cpus.update(range(low, high + 1))
    return frozenset(cpus)


def online_cpus(root: Path | str = "/") -> frozenset[int] | None:
    """The machine's online CPUs, or None when sysfs does not say."""
    try:
        return parse_cpu_list((Path(root) / ONLINE).read_text())
    except (OSError, ValueError):
        return None


def current_cpus() -> frozenset[int]:
    return frozenset(os.sched_getaffinity(0))


@dataclass(frozen=True)
class CpuPlacement:
    """What one worker process got: allowed at start, bound to now, the machine's CPUs."""

    allowed: frozenset[int]
    bound: frozenset[int]
    online: frozenset[int] | None

    @classmethod
    def observe(cls, allowed: Iterable[int] | None = None, root: Path | str = "/") -> CpuPlacement:
        """Call after pinning; `allowed` is what the process had before it (default: now)."""
        bound = current_cpus()
        return cls(
            allowed=frozenset(allowed) if allowed is not None else bound,
            bound=bound,
            online=online_cpus(root),
        )

    def settings(self) -> list[tuple[str, str]]:
        """Name/value pairs for `stats settings` ("-" for a set the machine did not tell)."""
        return [
            ("cpus", format_cpu_list(self.bound)),
            ("cpus_allowed", format_cpu_list(self.allowed)),
            ("cpus_online", format_cpu_list(self.online) if self.online is not None else "-"),
        ]
