"""Memory and cpuset cgroups for the pods the e2e node agent runs (test infrastructure).

One tree per agent instance, ``<root>/<pod-uid>/<container>``, nested under the agent's own
cgroup where the hierarchy allows it (so pods stay inside whatever limits the agent itself
runs under). cgroup v1 (separate memory and cpuset hierarchies) and v2 (unified) are both
handled; a process joins its container's cgroups before it execs (see ``join_argv``), so
everything it allocates is charged there from the start.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable
from pathlib import Path

CGROUP_FS = Path("/sys/fs/cgroup")


class CgroupError(Exception):
    pass


def _own_paths() -> dict[str, str]:
    """controller -> this process's cgroup path (v2 under the key "")."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for c in controllers.split(",") if controllers else [""]:
            paths[c] = path
    return paths


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as e:
        raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from e


class Cgroups:
    """The cgroup tree of one agent: create per-container groups, read them back, clean up."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Pod workers run in threads: one making the tree (root, pod) while another reads
        # a parent's cpus that are not written yet would copy an empty cpuset.
        self._lock = threading.Lock()
        self.unified = (CGROUP_FS / "cgroup.controllers").exists()
        own = _own_paths()
        if self.unified:
            self.memory_root = self._v2_root(own.get("", "/"))
            self.cpuset_root: Path | None = self.memory_root
        else:
            memory_fs = CGROUP_FS / "memory"
            if not (memory_fs / "memory.limit_in_bytes").exists():
                raise CgroupError(f"no cgroup v1 memory controller mounted at {memory_fs}")
            self.memory_root = memory_fs / own.get("memory", "/").lstrip("/") / name
            cpuset_fs = CGROUP_FS / "cpuset"
            self.cpuset_root = (
                cpuset_fs / own.get("cpuset", "/").lstrip("/") / name
                if (cpuset_fs / "cpuset.cpus").exists()
                else None
            )
        self._remove_abandoned()
        self._ensure_root()

    def _ensure_root(self) -> None:
        self._mkdir(self.memory_root, self.cpuset_root)
        if self.unified:
            self._enable_controllers(self.memory_root)

    def _remove_abandoned(self) -> None:
        """Empty trees of agents that died without cleaning up (SIGKILL) are removed. A live
        agent between pods may lose its empty root too: it makes it again when needed."""
        for root in {self.memory_root, self.cpuset_root} - {None}:
            for other in root.parent.glob("cache-appliance-*"):
                if other != root and other.is_dir() and not pids_under(other):
                    rmtree(other)

    # ---- v2 ------------------------------------------------------------------------------

    def _v2_root(self, own: str) -> Path:
        # cgroup v2 allows controllers for children only in a group without processes of its
        # own (the root excepted): put the tree beside this process's group, not inside it.
        own_dir = CGROUP_FS / own.lstrip("/")
        parent = own_dir if own in ("", "/") else own_dir.parent
        return parent / self.name

    @staticmethod
    def _enable_controllers(directory: Path) -> None:
        available = (directory / "cgroup.controllers").read_text().split()
        if "memory" not in available:
            raise CgroupError(f"the memory controller is not delegated to {directory}")
        wanted = [c for c in ("memory", "cpuset") if c in available]
        _write(directory / "cgroup.subtree_control", " ".join(f"+{c}" for c in wanted))

    # ---- tree ----------------------------------------------------------------------------

    def _mkdir(self, memory_dir: Path, cpuset_dir: Path | None) -> None:
        try:
            memory_dir.mkdir(exist_ok=True)
        except OSError as e:
            raise CgroupError(f"cannot create cgroup {memory_dir}: {e.strerror}") from e
        if cpuset_dir is not None and not self.unified:
            cpuset_dir.mkdir(exist_ok=True)
            # A v1 cpuset starts empty and takes no processes until cpus and mems are set.
            # Filled whenever found empty, not only when made here: another agent on this
            # machine may have removed this tree while it was empty, and it is remade.
            for f in ("cpuset.cpus", "cpuset.mems"):
                if not (cpuset_dir / f).read_text().strip():
                    _write(cpuset_dir / f, (cpuset_dir.parent / f).read_text().strip())

    def _dirs(self, rel: str) -> list[Path]:
        dirs = [self.memory_root / rel]
        if self.cpuset_root is not None and not self.unified:
            dirs.append(self.cpuset_root / rel)
        return dirs

    def create(
        self, pod_uid: str, container: str, memory_limit: int | None, cpus: Iterable[int] | None
    ) -> list[Path]:
        """Make ``<pod>/<container>`` with the limits; returns the cgroup.procs files to join."""
        pod_rel = pod_uid
        rel = f"{pod_uid}/{container}"
        with self._lock:
            self._ensure_root()
            for r in (pod_rel, rel):
                self._mkdir(self.memory_root / r, self.cpuset_root and self.cpuset_root / r)
            if self.unified:
                self._enable_controllers(self.memory_root / pod_rel)
        mem_dir = self.memory_root / rel
        limit_file = "memory.max" if self.unified else "memory.limit_in_bytes"
        _write(
            mem_dir / limit_file,
            str(memory_limit) if memory_limit else "max" if self.unified else "-1",
        )
        if cpus is not None and self.cpuset_root is not None:
            _write(self.cpuset_root / rel / "cpuset.cpus", ",".join(map(str, sorted(cpus))))
        return [d / "cgroup.procs" for d in self._dirs(rel)]

    def memory_limit_file(self, pod_uid: str, container: str) -> Path:
        name = "memory.max" if self.unified else "memory.limit_in_bytes"
        return self.memory_root / pod_uid / container / name

    def pids(self, rel: str = "") -> set[int]:
        return set().union(*(pids_under(top) for top in self._dirs(rel)))

    def remove(self, rel: str = "", timeout: float = 5.0) -> None:
        """Kill what is left in ``rel`` (everything when empty) and remove its groups."""
        deadline = time.monotonic() + timeout
        while (pids := self.pids(rel)) and time.monotonic() < deadline:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.05)
        for top in self._dirs(rel):
            rmtree(top)


def pids_under(top: Path) -> set[int]:
    found: set[int] = set()
    if top.exists():
        for procs in top.rglob("cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                found.update(int(p) for p in procs.read_text().split())
    return found


def rmtree(top: Path) -> None:
    """rmdir a cgroup tree, deepest first (a cgroup with children cannot be removed; its
    control files go with it)."""
    if not top.exists():
        return
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    with contextlib.suppress(OSError):
        top.rmdir()


def join_argv(procs_files: list[Path], argv: list[str]) -> list[str]:
    """``argv`` behind a tiny shell that moves itself into the cgroups, then execs."""
    script = (
        'n=$1; shift; while [ "$n" -gt 0 ]; do '
        'echo $$ > "$1" || { echo "node agent: cannot join cgroup $1" >&2; exit 126; }; '
        'shift; n=$((n - 1)); done; exec "$@"'
    )
    return ["/bin/sh", "-c", script, "sh", str(len(procs_files)), *map(str, procs_files), *argv]
