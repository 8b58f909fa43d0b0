"""The node agent's cgroup tree survives what happens on a shared machine: another agent
starting removes this agent's tree while it is empty, then several pods start at once."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest

from e2e.cgroups import CgroupError, Cgroups, rmtree


def test_pods_started_at_once_after_the_tree_was_removed_all_get_their_cpus():
    try:
        cgroups = Cgroups(f"cache-appliance-test-{secrets.token_hex(3)}")
    except (CgroupError, OSError) as e:
        pytest.skip(f"no cgroups to manage here: {e}")
    errors: list[str] = []
    try:
        for round_ in range(10):
            # What Cgroups(...) of a second agent does to a tree with no processes in it.
            for root in {cgroups.memory_root, cgroups.cpuset_root} - {None}:
                rmtree(root)
            uids = [f"pod-{round_}-{n}" for n in range(4)]

            def start(uid: str) -> None:
                try:
                    procs = cgroups.create(uid, "main", 64 * 1024 * 1024, {0})
                    assert all(p.exists() for p in procs)
                except (CgroupError, OSError, AssertionError) as e:
                    errors.append(f"{uid}: {e!r}")

            threads = [threading.Thread(target=start, args=(u,)) for u in uids]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            if cgroups.cpuset_root is not None and not cgroups.unified:
                for uid in uids:
                    cpus = Path(cgroups.cpuset_root / uid / "main" / "cpuset.cpus")
                    if cpus.read_text().strip() != "0":
                        errors.append(f"{uid}: cpuset.cpus is {cpus.read_text()!r}")
    finally:
        cgroups.remove()
    assert not errors, errors
