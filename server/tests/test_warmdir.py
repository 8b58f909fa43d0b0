"""cacheserver-warm-dir: the operator's init container prepares a pod's warm-restart
directory on the node and removes snapshots nobody came back for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cacheserver.warmdir import NO_NODE, not_latest, prepare, remove_snapshots, remove_stale


def test_prepare_makes_the_pod_directory_owned_by_the_server_user(tmp_path: Path) -> None:
    uid, gid = os.getuid(), os.getgid()  # as root in the pod: 10001
    target = prepare(tmp_path, "ns/cache/cache-0", uid, gid)
    assert target == tmp_path / "ns" / "cache" / "cache-0"
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (uid, gid, 0o700)
    assert prepare(tmp_path, "ns/cache/cache-0", uid, gid) == target  # again: no error


@pytest.mark.parametrize("bad", ["ns/cache", "ns/../etc/x", "/abs/ns/cache", "ns/cache/p/q"])
def test_prepare_refuses_anything_but_namespace_cluster_pod(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError):
        prepare(tmp_path, bad, os.getuid(), os.getgid())


def test_old_snapshots_go_and_fresh_ones_and_other_files_stay(tmp_path: Path) -> None:
    now = time.time()
    files = {
        "ns/a/a-0/snapshot": now - 3600,  # its pod never came back
        "ns/a/a-1/snapshot.1": now - 3600,  # a worker's, -t N
        "ns/a/a-2/snapshot.partial": now - 3600,  # a save that was cut short
        "ns/b/b-0/snapshot": now - 10,  # a restart in progress
        "ns/b/b-1/notes.txt": now - 3600,  # not ours
    }
    for name, mtime in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    removed = remove_stale(tmp_path, max_age=900, now=now)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == [
        "ns/a/a-0/snapshot",
        "ns/a/a-1/snapshot.1",
        "ns/a/a-2/snapshot.partial",
    ]
    assert (tmp_path / "ns/b/b-0/snapshot").exists()
    assert (tmp_path / "ns/b/b-1/notes.txt").exists()


def test_the_command_line(tmp_path: Path) -> None:
    stale = tmp_path / "ns/old/old-0/snapshot"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"x")
    os.utime(stale, (1, 1))
    owner = f"{os.getuid()}:{os.getgid()}"
    result = subprocess.run(
        [sys.executable, "-m", "cacheserver.warmdir", str(tmp_path), "ns/c/c-0", "--owner", owner],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "removed stale snapshot ns/old/old-0/snapshot" in result.stdout
    assert (tmp_path / "ns/c/c-0").is_dir() and not stale.exists()
    bad = subprocess.run(
        [sys.executable, "-m", "cacheserver.warmdir", str(tmp_path), "../x/y"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and "is not <namespace>/<cluster>/<pod>" in bad.stderr


# ---- the latest snapshot only ---------------------------------------------------------


@pytest.mark.parametrize(
    ("node", "last_node", "removed"),
    [
        ("node-2", "node-2", False),  # back where it last ran: its latest snapshot
        ("node-2", "node-4", True),  # it ran on node-4 since: node-2's is older than that
        ("node-2", NO_NODE, True),  # the operator knows no node: not this appliance's
        ("node-2", "", False),  # the operator did not say: kept, as before
        ("", "node-2", True),  # this node unknown: cannot be told apart
    ],
)
def test_only_the_node_it_last_ran_on_keeps_its_snapshot(node, last_node, removed):
    assert (not_latest(node, last_node) is not None) is removed


def test_a_snapshot_older_than_the_appliances_last_node_is_removed_whole(tmp_path: Path) -> None:
    target = prepare(tmp_path, "ns/c/c-0", os.getuid(), os.getgid())
    for name in ("snapshot.0", "snapshot.1", "snapshot.partial", "notes.txt"):
        (target / name).write_bytes(b"x")
    removed = remove_snapshots(target)
    assert sorted(p.name for p in removed) == ["snapshot.0", "snapshot.1", "snapshot.partial"]
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]


def test_the_command_line_removes_a_snapshot_the_appliance_moved_away_from(
    tmp_path: Path,
) -> None:
    """node-2's snapshot of c-0, saved before c-0 ran on node-4: the init container on
    node-2 removes it (the server then starts empty); on node-4 it would be kept."""
    snapshot = tmp_path / "ns/c/c-0/snapshot"
    snapshot.parent.mkdir(parents=True)
    owner = f"{os.getuid()}:{os.getgid()}"

    def run(node: str, last_node: str) -> str:
        snapshot.write_bytes(b"x")
        result = subprocess.run(
            [sys.executable, "-m", "cacheserver.warmdir", str(tmp_path), "ns/c/c-0",
             "--owner", owner, "--node", node, "--last-node", last_node],
            capture_output=True,
            text=True,
            timeout=30,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = run("node-2", "node-4")
    assert not snapshot.exists()
    assert (
        "removed snapshot ns/c/c-0/snapshot: the appliance ran on node-4 after this snapshot "
        "was saved here on node-2" in out
    )
    assert "removed snapshot" not in run("node-4", "node-4") and snapshot.exists()
    assert "removed snapshot" not in run("node-2", "") and snapshot.exists()
