"""Find this process's memory cgroup on disk, from /proc/self/cgroup and /proc/self/mountinfo.

Every function takes `root`: the directory that stands for "/" (a fixture tree in tests).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class CgroupError(Exception):
    """The memory cgroup could not be located; the message names the file at fault."""


@dataclass(frozen=True)
class CgroupDir:
    """One memory cgroup directory of the process's hierarchy.

    `path` and `mount` are on this file system (under `root`); `display` is the path as the
    process sees it, for logs and the `memory_limit_source` setting.
    """

    version: int
    path: Path
    mount: Path
    root: Path

    @property
    def display(self) -> str:
        rel = self.path.relative_to(self.root)
        return "/" if rel == Path(".") else "/" + rel.as_posix()

    def file(self, name: str) -> Path:
        return self.path / name

    def show(self, name: str) -> str:
        """How a file of this cgroup is named in messages."""
        return f"{self.display.rstrip('/')}/{name}"

    def ancestors(self) -> Iterator[CgroupDir]:
        """This cgroup, then each parent up to the top of the mounted hierarchy."""
        path = self.path
        while True:
            yield CgroupDir(self.version, path, self.mount, self.root)
            if path == self.mount or path.parent == path:
                return
            path = path.parent


@dataclass(frozen=True)
class CgroupLine:
    hierarchy: str
    controllers: tuple[str, ...]
    path: str


@dataclass(frozen=True)
class MountLine:
    mount_root: str
    mount_point: str
    fstype: str
    super_options: tuple[str, ...]


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_proc_cgroup(text: str, name: str = "/proc/self/cgroup") -> list[CgroupLine]:
    lines = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        parts = raw.split(":", 2)
        if len(parts) != 3:
            raise CgroupError(f"{name} line {number} is not 'id:controllers:path': {raw!r}")
        hierarchy, controllers, path = parts
        lines.append(CgroupLine(hierarchy, tuple(c for c in controllers.split(",") if c), path))
    return lines


def parse_mountinfo(text: str, name: str = "/proc/self/mountinfo") -> list[MountLine]:
    mounts = []
    for number, raw in enumerate(text.splitlines(), 1):
        if not raw.strip():
            continue
        fields = raw.split()
        try:
            # Optional fields end at a lone "-"; fstype, source and super options follow it.
            dash = fields.index("-", 6)
            mounts.append(
                MountLine(
                    mount_root=_unescape(fields[3]),
                    mount_point=_unescape(fields[4]),
                    fstype=fields[dash + 1],
                    super_options=tuple(fields[dash + 3].split(",")),
                )
            )
        except (ValueError, IndexError):
            raise CgroupError(f"{name} line {number} is malformed: {raw!r}") from None
    return mounts


def _read(root: Path, absolute: str) -> str:
    path = root / absolute.lstrip("/")
    try:
        return path.read_text()
    except OSError as exc:
        raise CgroupError(f"cannot read {absolute}: {exc.strerror or exc}") from None


def _under_root(root: Path, absolute: str) -> Path:
    return root / absolute.lstrip("/")


def _map_path(root: Path, mount: MountLine, cgroup_path: str) -> tuple[Path, str | None]:
    """Turn a cgroup path into a directory, given the mount that holds its hierarchy.

    The mount's root is the part of the hierarchy it shows (a container sees its own cgroup
    mounted as the top); with a cgroup namespace /proc/self/cgroup shows paths relative to it.
    """
    mount_dir = _under_root(root, mount.mount_point)
    mroot = mount.mount_root.rstrip("/")
    if cgroup_path == mount.mount_root or cgroup_path.startswith(mroot + "/"):
        rel = cgroup_path[len(mroot) :]
    elif mroot == "":
        rel = cgroup_path
    else:
        return mount_dir, (
            f"cgroup path {cgroup_path} is outside the mounted part {mount.mount_root} "
            f"of the hierarchy at {mount.mount_point}; using the mount point"
        )
    path = mount_dir / rel.lstrip("/")
    if not path.is_dir():
        return mount_dir, (
            f"cgroup directory {mount.mount_point.rstrip('/')}{rel} does not exist; "
            "using the mount point"
        )
    return path, None


def _memory_on_v2(path: Path) -> bool:
    """Whether the memory controller is active in a cgroup2 directory."""
    controllers = path / "cgroup.controllers"
    try:
        return "memory" in controllers.read_text().split()
    except OSError:
        return (path / "memory.current").exists() or (path / "memory.max").exists()


def locate_memory_cgroup(root: Path | str = "/") -> tuple[CgroupDir, list[str]]:
    """The memory cgroup of this process and any warnings met finding it.

    Raises CgroupError when there is none (no cgroup files, no memory controller).
    """
    root = Path(root)
    cgroups = parse_proc_cgroup(_read(root, "/proc/self/cgroup"))
    mounts = parse_mountinfo(_read(root, "/proc/self/mountinfo"))
    warnings: list[str] = []

    # A controller lives in one hierarchy only: a v1 "memory" line wins over the unified one.
    v1 = next((c for c in cgroups if "memory" in c.controllers), None)
    if v1 is not None:
        mount = next(
            (m for m in mounts if m.fstype == "cgroup" and "memory" in m.super_options), None
        )
        if mount is None:
            raise CgroupError(
                "/proc/self/cgroup names a cgroup v1 memory controller but "
                "/proc/self/mountinfo shows no cgroup mount with the memory option"
            )
        path, warning = _map_path(root, mount, v1.path)
        warnings += [warning] if warning else []
        return CgroupDir(1, path, _under_root(root, mount.mount_point), root), warnings

    v2 = next((c for c in cgroups if c.hierarchy == "0" and not c.controllers), None)
    if v2 is None:
        raise CgroupError("/proc/self/cgroup has neither a v1 memory line nor a v2 '0::' line")
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if mount is None:
        raise CgroupError("/proc/self/mountinfo shows no cgroup2 mount")
    path, warning = _map_path(root, mount, v2.path)
    warnings += [warning] if warning else []
    mount_dir = _under_root(root, mount.mount_point)
    if not (_memory_on_v2(path) or _memory_on_v2(mount_dir)):
        raise CgroupError(
            f"the memory controller is not enabled in the cgroup2 hierarchy at {mount.mount_point}"
        )
    return CgroupDir(2, path, mount_dir, root), warnings
