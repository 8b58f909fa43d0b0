"""`make up` and `make down` as a new user runs them: a cluster of 3 real nodes in 2 zones,
the chart, the operator pod and the example, Ready, with endpoints that answer the
one-liners it printed; then nothing left: no process, mount, cgroup, network namespace or
link, and the host settings the kubelets changed are back.

It starts a second control plane and nodes of its own (in a temporary state directory), so
it does not need the suite's cluster."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from e2e import procs
from e2e.base import REPO_ROOT, missing_binaries
from e2e.nodes import HOST_SYSCTLS, Network

pytestmark = pytest.mark.skipif(
    bool(os.environ.get("E2E_KUBECONFIG")), reason="E2E_KUBECONFIG: make up starts its own"
)


def make(target: str, state_dir: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "-s", target],
        cwd=REPO_ROOT,
        env={**os.environ, "E2E_STATE_DIR": str(state_dir)},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def processes_under(state_dir: Path) -> list[str]:
    """Processes whose command line or working directory lies in the state directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if str(state_dir) in cmdline or cwd.startswith(str(state_dir)):
            found.append(f"{entry.name}: {cmdline.strip()} (in {cwd})")
    return found


def recorded_processes(state_dir: Path) -> list[procs.ProcessRecord]:
    records = [
        procs.ProcessRecord.from_dict(p)
        for p in json.loads((state_dir / "cluster" / "state.json").read_text())["processes"]
    ]
    for node in json.loads((state_dir / "nodes" / "nodes.json").read_text())["nodes"]:
        records += [procs.ProcessRecord.from_dict(p) for p in node["processes"]]
    return records


def traces(tag: str, state_dir: Path) -> list[str]:
    """What a cluster's nodes leave on the machine: links and namespaces named after the
    cluster's tag, cgroups, mounts under the state directory."""
    found = [f"link {n}" for n in os.listdir("/sys/class/net") if n.startswith(tag)]
    if Path("/run/netns").is_dir():
        found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(tag)]
    found += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").glob(f"*/{tag}-*")]
    found += [f"run dir {p}" for p in Path("/run/cache-e2e").glob(f"{tag}")]
    found += [
        f"mount {line.split()[1]}"
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if str(state_dir) in line.split()[1]
    ]
    return found


def test_make_up_serves_the_example_and_make_down_leaves_nothing(tmp_path):
    if missing_binaries():
        pytest.skip(f"control-plane binaries not built ({missing_binaries()}): make e2e-bins")
    state_dir = tmp_path / "state"
    records: list[procs.ProcessRecord] = []
    sysctls = {k: Path("/proc/sys", k).read_text() for k in HOST_SYSCTLS}
    tag = None
    try:
        up = make("up", state_dir, 400)
        output = up.stdout + up.stderr
        assert up.returncode == 0, output
        assert "CacheCluster cache Ready" in output, output
        tag = Network(json.loads((state_dir / "nodes" / "nodes.json").read_text())["subnet"]).tag
        records = recorded_processes(state_dir)
        names = {r.name for r in records}
        assert {"etcd", "kube-apiserver", "kubelet", "containerd", "kube-proxy"} <= names, names
        assert all(r.alive() for r in records)
        assert re.search(r"operator pod cache-operator-\S+ Ready on node-\d", output), output

        # The endpoints it printed answer, with the one-liners it printed.
        servers = re.findall(r"^\s+(198\.18\.\d+\.\d+):(\d+)\s+cache-\d", output, re.M)
        assert len(servers) == 3, output
        line = next(x for x in output.splitlines() if "/dev/tcp/" in x).strip()
        reply = subprocess.run(
            ["sh", "-c", line], capture_output=True, text=True, timeout=30, check=False
        )
        assert reply.stdout.replace("\r", "") == "STORED\nVALUE hello 0 5\nworld\nEND\n", reply
        script = next(x for x in output.splitlines() if "HashClient" in x).strip()
        reply = subprocess.run(
            ["sh", "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30
        )
        assert reply.stdout.strip() == "b'world'", reply.stderr

        status = subprocess.run(
            [sys.executable, "-m", "e2e.cluster", "--state-dir", str(state_dir), "status"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert "kubelet" in status.stdout and "EXITED" not in status.stdout, status
    finally:
        down = make("down", state_dir, 180)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [r.name for r in records if r.alive()], "make down left recorded processes"
    assert not processes_under(state_dir), processes_under(state_dir)
    assert not state_dir.exists()
    if tag:
        assert not traces(tag, state_dir), traces(tag, state_dir)
    assert {k: Path("/proc/sys", k).read_text() for k in HOST_SYSCTLS} == sysctls
