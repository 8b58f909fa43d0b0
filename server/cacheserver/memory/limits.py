"""How much memory this process may use: its cgroup's limit, the downward API, or the machine.

`detect_memory_limit` never raises for bad input: every unreadable or malformed file becomes a
warning that names it, and the answer falls back to the next safe source.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .cgroupfs import CgroupDir, CgroupError, locate_memory_cgroup

ENV_LIMIT = "CACHESERVER_CONTAINER_MEMORY_LIMIT"

# cgroup v1 writes "no limit" as the largest page-aligned counter (9223372036854771712);
# any value this large cannot be a real limit.
UNLIMITED = 1 << 60

# The last resort when not even /proc/meminfo can be read: memcached's own default size.
FALLBACK_LIMIT = 64 << 20


@dataclass(frozen=True)
class MemoryLimit:
    """The tightest memory limit found, where it came from, and what went wrong on the way.

    `cgroup` is the cgroup whose usage counts against the limit (the shrinker watches it);
    None when the limit is the machine's (its usage counts) or the environment's alone (then
    it is this server's budget, and the process's own resident memory counts).
    """

    limit_bytes: int
    source: str
    warnings: tuple[str, ...] = ()
    cgroup: CgroupDir | None = None


@dataclass(frozen=True)
class _Candidate:
    limit: int
    source: str
    cgroup: CgroupDir | None


def _read_int_file(path: Path, shown: str, problems: list[str], *, optional: bool) -> int | None:
    """An integer (or "max") from a one-value cgroup file; None for no limit or no file."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        if not optional:
            problems.append(f"{shown} is missing")
        return None
    except OSError as exc:
        problems.append(f"cannot read {shown}: {exc.strerror or exc}")
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        problems.append(f"{shown} is malformed (expected bytes or 'max'): {text[:40]!r}")
        return None
    if value < 0:
        problems.append(f"{shown} is negative: {value}")
        return None
    return value if value < UNLIMITED else None


def read_key_values(path: Path, shown: str, problems: list[str]) -> dict[str, int]:
    """A 'key value' per line file (memory.stat, memory.events, /proc/meminfo)."""
    try:
        text = path.read_text()
    except OSError as exc:
        problems.append(f"cannot read {shown}: {exc.strerror or exc}")
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.replace(":", " ").split()
        if len(parts) >= 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                problems.append(f"{shown} has a malformed line: {line[:60]!r}")
    return values


def _v1_candidates(leaf: CgroupDir, problems: list[str]) -> list[_Candidate]:
    found = []
    for cg in leaf.ancestors():
        name = "memory.limit_in_bytes"
        value = _read_int_file(cg.file(name), cg.show(name), problems, optional=cg != leaf)
        if value is not None:
            found.append(_Candidate(value, f"cgroup1:{cg.show(name)}", cg))
    # The kernel folds in the limits of ancestors this mount does not show.
    stat = read_key_values(leaf.file("memory.stat"), leaf.show("memory.stat"), problems)
    hier = stat.get("hierarchical_memory_limit")
    if hier is not None and hier < UNLIMITED:
        source = f"cgroup1:{leaf.show('memory.stat')}:hierarchical_memory_limit"
        found.append(_Candidate(hier, source, leaf))
    return found


def _v2_candidates(leaf: CgroupDir, problems: list[str]) -> list[_Candidate]:
    found = []
    for cg in leaf.ancestors():
        # The top of a cgroup2 mount that is the real root has no memory.max: not an error.
        optional = cg != leaf or cg.path == cg.mount
        for name in ("memory.max", "memory.high"):
            value = _read_int_file(cg.file(name), cg.show(name), problems, optional=optional)
            if value is not None:
                found.append(_Candidate(value, f"cgroup2:{cg.show(name)}", cg))
            optional = True  # memory.high is a throttle some setups do not have
    return found


def _env_candidate(env: Mapping[str, str], problems: list[str]) -> _Candidate | None:
    raw = env.get(ENV_LIMIT, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        problems.append(f"{ENV_LIMIT} must be a number of bytes, got {raw[:40]!r}; ignoring it")
        return None
    if value <= 0 or value >= UNLIMITED:
        # The downward API reports node allocatable memory when no limit is set: also fine.
        problems.append(f"{ENV_LIMIT}={value} is not a usable limit; ignoring it")
        return None
    return _Candidate(value, "env", None)


def read_mem_total(root: Path, problems: list[str]) -> int | None:
    meminfo = read_key_values(root / "proc/meminfo", "/proc/meminfo", problems)
    total_kib = meminfo.get("MemTotal")
    if total_kib is None:
        if meminfo:
            problems.append("/proc/meminfo has no MemTotal line")
        return None
    return total_kib * 1024


def detect_memory_limit(
    root: Path | str = "/", env: Mapping[str, str] | None = None
) -> MemoryLimit:
    """The tightest of: the memory cgroup's limits (walking up), the env limit, the machine."""
    root = Path(root)
    env = os.environ if env is None else env
    problems: list[str] = []
    candidates: list[_Candidate] = []

    memory_cgroup: CgroupDir | None = None
    try:
        memory_cgroup, located = locate_memory_cgroup(root)
        problems += located
    except CgroupError as exc:
        problems.append(f"no memory cgroup: {exc}")
    if memory_cgroup is not None:
        if memory_cgroup.version == 1:
            candidates += _v1_candidates(memory_cgroup, problems)
        else:
            candidates += _v2_candidates(memory_cgroup, problems)
    env_limit = _env_candidate(env, problems)
    if env_limit is not None:
        candidates.append(env_limit)

    machine = read_mem_total(root, problems)
    best = min(candidates, key=lambda c: c.limit, default=None)
    if best is not None and (machine is None or best.limit <= machine):
        return MemoryLimit(best.limit, best.source, tuple(problems), best.cgroup)
    if best is not None:
        problems.append(
            f"the limit from {best.source} ({best.limit} bytes) is above the machine's "
            f"memory; using MemTotal"
        )
    if machine is not None:
        # No cgroup limit: the whole machine is ours to share.
        return MemoryLimit(machine, "meminfo", tuple(problems))
    problems.append(f"no memory limit could be read; assuming {FALLBACK_LIMIT >> 20} MiB")
    return MemoryLimit(FALLBACK_LIMIT, "default", tuple(problems))
