"""Limit detection over fixture trees that look like /proc and /sys/fs/cgroup of real hosts."""

from __future__ import annotations

from pathlib import Path

import pytest

from cacheserver.memory import ENV_LIMIT, detect_memory_limit
from cacheserver.memory.cgroupfs import CgroupError, locate_memory_cgroup

MIB = 1 << 20
GIB = 1 << 30
V1_UNLIMITED = "9223372036854771712"
MACHINE = 16 * GIB

V2_MOUNT = (
    "36 25 0:31 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw"
)
V1_MEMORY_MOUNT = (
    "40 31 0:35 {root} /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:20"
    " - cgroup cgroup rw,memory"
)
V1_CPU_MOUNT = "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu"
ROOT_MOUNT = "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw"


def tree(
    tmp_path: Path,
    *,
    cgroup: str | None,
    mountinfo: list[str] | None,
    files: dict[str, str],
    meminfo: str | None = f"MemTotal:       {MACHINE // 1024} kB\nMemFree:  1000 kB\n",
) -> Path:
    """Write a fake root: /proc/self/{cgroup,mountinfo}, /proc/meminfo and cgroup files."""
    root = tmp_path / "root"
    (root / "proc/self").mkdir(parents=True)
    if cgroup is not None:
        (root / "proc/self/cgroup").write_text(cgroup)
    if mountinfo is not None:
        (root / "proc/self/mountinfo").write_text("\n".join(mountinfo) + "\n")
    if meminfo is not None:
        (root / "proc/meminfo").write_text(meminfo)
    for name, text in files.items():
        path = root / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def v2_pod(tmp_path: Path, **files: str) -> Path:
    """A kubelet-style cgroup2 layout: /kubepods/burstable/pod1/ctr, the process in ctr."""
    base = "/sys/fs/cgroup/kubepods/burstable/pod1"
    layout = {
        "/sys/fs/cgroup/cgroup.controllers": "cpuset cpu io memory pids\n",
        f"{base}/memory.max": "max\n",
        f"{base}/ctr/cgroup.controllers": "cpu io memory pids\n",
        f"{base}/ctr/memory.max": "max\n",
    }
    layout.update({f"{base}/{k.replace('__', '/').replace('_', '.')}": v for k, v in files.items()})
    return tree(
        tmp_path,
        cgroup="0::/kubepods/burstable/pod1/ctr\n",
        mountinfo=[ROOT_MOUNT, V2_MOUNT],
        files=layout,
    )


def v1_cgroup(tmp_path: Path, files: dict[str, str], path: str = "/docker/abc") -> Path:
    """A cgroup v1 host (hierarchy mounted at its root) with the process in `path`."""
    leaf = f"/sys/fs/cgroup/memory{path}"
    layout = {
        "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
        f"{leaf}/memory.limit_in_bytes": V1_UNLIMITED,
        f"{leaf}/memory.stat": f"cache 0\nrss 0\nhierarchical_memory_limit {V1_UNLIMITED}\n",
    }
    layout.update(files)
    return tree(
        tmp_path,
        cgroup=f"5:cpu,cpuacct:/\n4:memory:{path}\n0::/\n",
        mountinfo=[ROOT_MOUNT, V1_CPU_MOUNT, V1_MEMORY_MOUNT.format(root="/")],
        files=layout,
    )


# -- cgroup v2 ---------------------------------------------------------------------------


def test_v2_container_limit(tmp_path: Path) -> None:
    root = v2_pod(tmp_path, ctr__memory_max=f"{256 * MIB}\n")
    limit = detect_memory_limit(root, env={})
    assert limit.limit_bytes == 256 * MIB
    assert limit.source == "cgroup2:/sys/fs/cgroup/kubepods/burstable/pod1/ctr/memory.max"
    assert limit.cgroup is not None and limit.cgroup.display.endswith("/pod1/ctr")
    assert limit.warnings == ()


def test_v2_tightest_ancestor_wins(tmp_path: Path) -> None:
    # Only the pod has a limit: the container's own memory.max says "max".
    root = v2_pod(tmp_path, memory_max=f"{128 * MIB}\n", ctr__memory_max=f"{512 * MIB}\n")
    limit = detect_memory_limit(root, env={})
    assert limit.limit_bytes == 128 * MIB
    assert limit.source == "cgroup2:/sys/fs/cgroup/kubepods/burstable/pod1/memory.max"
    # The shrinker must watch the pod, whose usage the 128 MiB applies to.
    assert (
        limit.cgroup is not None
        and limit.cgroup.display == "/sys/fs/cgroup/kubepods/burstable/pod1"
    )


def test_v2_memory_high_below_max_wins(tmp_path: Path) -> None:
    root = v2_pod(tmp_path, ctr__memory_max=f"{256 * MIB}\n", ctr__memory_high=f"{200 * MIB}\n")
    limit = detect_memory_limit(root, env={})
    assert limit.limit_bytes == 200 * MIB
    assert limit.source.endswith("/ctr/memory.high")


def test_v2_cgroup_namespace_sees_itself_as_root(tmp_path: Path) -> None:
    # Docker/containerd with a private cgroup namespace: "0::/" and the container's cgroup
    # mounted as /sys/fs/cgroup.
    root = tree(
        tmp_path,
        cgroup="0::/\n",
        mountinfo=[ROOT_MOUNT, V2_MOUNT],
        files={
            "/sys/fs/cgroup/cgroup.controllers": "cpu memory pids\n",
            "/sys/fs/cgroup/memory.max": f"{300 * MIB}\n",
        },
    )
    limit = detect_memory_limit(root, env={})
    assert (limit.limit_bytes, limit.source) == (300 * MIB, "cgroup2:/sys/fs/cgroup/memory.max")


def test_v2_unlimited_falls_back_to_machine_memory(tmp_path: Path) -> None:
    root = v2_pod(tmp_path)
    limit = detect_memory_limit(root, env={})
    assert (limit.limit_bytes, limit.source) == (MACHINE, "meminfo")
    assert limit.cgroup is None


def test_v2_without_memory_controller_says_so(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        cgroup="0::/user.slice\n",
        mountinfo=[ROOT_MOUNT, V2_MOUNT],
        files={
            "/sys/fs/cgroup/cgroup.controllers": "cpu pids\n",
            "/sys/fs/cgroup/user.slice/cgroup.controllers": "cpu pids\n",
        },
    )
    limit = detect_memory_limit(root, env={})
    assert limit.source == "meminfo"
    assert any("memory controller is not enabled" in w for w in limit.warnings)


# -- cgroup v1 ---------------------------------------------------------------------------


def test_v1_limit_in_bytes(tmp_path: Path) -> None:
    root = v1_cgroup(
        tmp_path, {"/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{256 * MIB}\n"}
    )
    limit = detect_memory_limit(root, env={})
    assert limit.limit_bytes == 256 * MIB
    assert limit.source == "cgroup1:/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes"
    assert limit.cgroup is not None and limit.cgroup.version == 1


def test_v1_nested_parent_is_tighter(tmp_path: Path) -> None:
    root = v1_cgroup(
        tmp_path,
        {
            "/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes": f"{128 * MIB}\n",
            "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.limit_in_bytes": f"{512 * MIB}\n",
            "/sys/fs/cgroup/memory/kubepods/pod1/ctr/memory.stat": (
                f"hierarchical_memory_limit {128 * MIB}\n"
            ),
        },
        path="/kubepods/pod1/ctr",
    )
    limit = detect_memory_limit(root, env={})
    assert limit.limit_bytes == 128 * MIB
    assert limit.source == "cgroup1:/sys/fs/cgroup/memory/kubepods/pod1/memory.limit_in_bytes"


def test_v1_hierarchical_limit_from_hidden_ancestor(tmp_path: Path) -> None:
    # Docker without a cgroup namespace mounts the container's own cgroup as the hierarchy
    # root: ancestors are invisible, and only memory.stat tells their limit.
    root = tree(
        tmp_path,
        cgroup="4:memory:/docker/abc\n",
        mountinfo=[ROOT_MOUNT, V1_MEMORY_MOUNT.format(root="/docker/abc")],
        files={
            "/sys/fs/cgroup/memory/memory.limit_in_bytes": V1_UNLIMITED,
            "/sys/fs/cgroup/memory/memory.stat": f"rss 1\nhierarchical_memory_limit {96 * MIB}\n",
        },
    )
    limit = detect_memory_limit(root, env={})
    assert limit.limit_bytes == 96 * MIB
    assert limit.source == "cgroup1:/sys/fs/cgroup/memory/memory.stat:hierarchical_memory_limit"


def test_v1_unlimited_falls_back_to_machine_memory(tmp_path: Path) -> None:
    limit = detect_memory_limit(v1_cgroup(tmp_path, {}), env={})
    assert (limit.limit_bytes, limit.source, limit.warnings) == (MACHINE, "meminfo", ())


def test_hybrid_host_uses_v1_memory_controller(tmp_path: Path) -> None:
    # systemd "hybrid": a cgroup2 hierarchy without the memory controller next to v1 memory.
    root = v1_cgroup(
        tmp_path,
        {
            "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes": f"{64 * MIB}\n",
            "/sys/fs/cgroup/unified/cgroup.controllers": "",
        },
    )
    mountinfo = root / "proc/self/mountinfo"
    mountinfo.write_text(
        mountinfo.read_text()
        + "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
    )
    limit = detect_memory_limit(root, env={})
    assert (limit.limit_bytes, limit.cgroup.version if limit.cgroup else None) == (64 * MIB, 1)


def test_mount_point_with_escaped_space(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        cgroup="4:memory:/a\n",
        mountinfo=[r"40 31 0:35 / /cg\040mem rw - cgroup cgroup rw,memory"],
        files={"/cg mem/a/memory.limit_in_bytes": f"{10 * MIB}\n"},
    )
    limit = detect_memory_limit(root, env={})
    assert (limit.limit_bytes, limit.source) == (
        10 * MIB,
        "cgroup1:/cg mem/a/memory.limit_in_bytes",
    )


# -- the environment (downward API) ------------------------------------------------------


def test_env_limit_when_cgroup_unlimited(tmp_path: Path) -> None:
    root = v2_pod(tmp_path)
    limit = detect_memory_limit(root, env={ENV_LIMIT: str(200 * MIB)})
    assert (limit.limit_bytes, limit.source) == (200 * MIB, "env")


def test_cgroup_tighter_than_env_wins(tmp_path: Path) -> None:
    root = v2_pod(tmp_path, ctr__memory_max=f"{100 * MIB}\n")
    limit = detect_memory_limit(root, env={ENV_LIMIT: str(200 * MIB)})
    assert limit.limit_bytes == 100 * MIB and limit.source.startswith("cgroup2:")


def test_malformed_env_is_named_and_ignored(tmp_path: Path) -> None:
    root = v2_pod(tmp_path, ctr__memory_max=f"{100 * MIB}\n")
    limit = detect_memory_limit(root, env={ENV_LIMIT: "256Mi"})
    assert limit.limit_bytes == 100 * MIB
    assert any(ENV_LIMIT in w and "256Mi" in w for w in limit.warnings)


# -- broken input ------------------------------------------------------------------------


def test_malformed_limit_file_is_named_and_skipped(tmp_path: Path) -> None:
    root = v2_pod(tmp_path, memory_max=f"{400 * MIB}\n", ctr__memory_max="lots\n")
    limit = detect_memory_limit(root, env={})
    # The pod's limit still holds; the broken container file is reported by name.
    assert limit.limit_bytes == 400 * MIB
    assert any(
        "/sys/fs/cgroup/kubepods/burstable/pod1/ctr/memory.max is malformed" in w
        for w in limit.warnings
    )


def test_missing_leaf_limit_file_is_named(tmp_path: Path) -> None:
    root = v1_cgroup(tmp_path, {})
    (root / "sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes").unlink()
    limit = detect_memory_limit(root, env={})
    assert limit.source == "meminfo"
    assert "/sys/fs/cgroup/memory/docker/abc/memory.limit_in_bytes is missing" in limit.warnings


def test_missing_proc_self_cgroup(tmp_path: Path) -> None:
    root = tree(tmp_path, cgroup=None, mountinfo=[ROOT_MOUNT], files={})
    limit = detect_memory_limit(root, env={})
    assert (limit.limit_bytes, limit.source) == (MACHINE, "meminfo")
    assert any("cannot read /proc/self/cgroup" in w for w in limit.warnings)


def test_malformed_proc_self_cgroup_names_the_line(tmp_path: Path) -> None:
    root = tree(tmp_path, cgroup="garbage\n", mountinfo=[ROOT_MOUNT], files={})
    with pytest.raises(CgroupError, match=r"/proc/self/cgroup line 1"):
        locate_memory_cgroup(root)
    assert detect_memory_limit(root, env={}).source == "meminfo"


def test_cgroup_dir_missing_uses_mount_point_with_warning(tmp_path: Path) -> None:
    root = tree(
        tmp_path,
        cgroup="4:memory:/gone\n",
        mountinfo=[V1_MEMORY_MOUNT.format(root="/")],
        files={"/sys/fs/cgroup/memory/memory.limit_in_bytes": f"{50 * MIB}\n"},
    )
    limit = detect_memory_limit(root, env={})
    assert limit.limit_bytes == 50 * MIB
    assert any("/sys/fs/cgroup/memory/gone does not exist" in w for w in limit.warnings)


def test_limit_above_machine_memory_uses_machine(tmp_path: Path) -> None:
    root = v2_pod(tmp_path, ctr__memory_max=f"{64 * GIB}\n")
    limit = detect_memory_limit(root, env={})
    assert (limit.limit_bytes, limit.source) == (MACHINE, "meminfo")
    assert any("above the machine's memory" in w for w in limit.warnings)


def test_nothing_readable_falls_back_to_a_small_default(tmp_path: Path) -> None:
    root = tree(tmp_path, cgroup=None, mountinfo=None, files={}, meminfo=None)
    limit = detect_memory_limit(root, env={})
    assert (limit.limit_bytes, limit.source) == (64 * MIB, "default")
    assert any("/proc/meminfo" in w for w in limit.warnings)
