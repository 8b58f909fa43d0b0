"""A CacheCluster over its life, as its user sees it: `kubectl scale` up and down, more
replicas than the nodes can take, a spec change rolled pod by pod, a killed server, the
operator killed in the middle of its work, deletion, and the memory limit reaching the
server, and what the kubelet really gave each appliance. The operator is the chart's pod,
with the chart's RBAC."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from kubernetes import watch

from e2e import product
from e2e.appliance import (
    GROUP,
    PLURAL,
    VERSION,
    conditions,
    endpoints,
    kubectl,
    load_manifest,
    memcached_roundtrip,
    pid_of,
    stats,
)
from e2e.base import wait_for
from e2e.nodes import container_cgroup

DEFAULT = product.EXAMPLES / "cachecluster.yaml"  # 3 appliances, every default
TIMEOUT = 120


def events_of(caches, name: str) -> list[tuple[str, str]]:
    listing = caches.core.list_namespaced_event(
        caches.namespace, field_selector=f"involvedObject.name={name}"
    )
    return [(e.type, e.reason) for e in listing.items]


def test_scale_up_down_and_beyond_the_nodes(caches, tools, cluster, operator):
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    ns = ("--namespace", caches.namespace)
    caches.create(manifest)
    caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)

    kubectl(tools, cluster, "scale", "cachecluster", name, "--replicas=5", *ns)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=5)
    assert len(endpoints(status)) == 5

    # Spread puts one appliance per host and there are 8 nodes: the ninth cannot be placed.
    kubectl(tools, cluster, "scale", "cachecluster", name, "--replicas=9", *ns)
    status = caches.wait(
        name,
        "Degraded (Unschedulable) with the other 8 ready",
        lambda s: s.get("phase") == "Degraded" and s.get("readyReplicas") == 8,
        TIMEOUT,
    )
    degraded = conditions(status)["Degraded"]
    assert degraded[:2] == ("True", "Unschedulable"), degraded
    assert "9 pods need 9 hosts" in degraded[2], degraded  # the hint says what it takes
    assert "didn't have free ports" in degraded[2], degraded  # the scheduler's own words
    assert ("Warning", "Unschedulable") in events_of(caches, name)
    # A condition, not a crash loop: the operator runs on and the 8 appliances serve.
    assert operator.ready(), "the operator stopped being Ready"
    for ep in endpoints(status):
        assert memcached_roundtrip(ep, "still-here", b"yes") == b"yes"

    kubectl(tools, cluster, "scale", "cachecluster", name, "--replicas=2", *ns)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=2)
    assert len(endpoints(status)) == 2
    assert conditions(status)["Degraded"][:2] == ("False", "AsExpected")
    caches.wait(
        name,
        "the scaled-down pods to be gone",
        lambda _: len(caches.pods(name)) == 2,
        TIMEOUT,
    )


def test_spec_change_rolls_the_pods_progressing_then_ready(caches):
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest)
    caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)
    before = {p.metadata.name: p.metadata.uid for p in caches.live_pods(name)}

    generation = caches.patch_spec(name, {"extraArgs": ["-c", "2048"]})["metadata"]["generation"]
    seen: list[tuple[str, str]] = []

    def rolled(status: dict) -> bool:
        if status.get("observedGeneration") == generation:
            progressing = conditions(status).get("Progressing", ("", "", ""))
            step = (status.get("phase", ""), progressing[1])
            if not seen or seen[-1] != step:
                seen.append(step)
        return seen[-1:] == [("Ready", "Complete")] and status.get("readyReplicas") == 3

    status = caches.wait(name, "the rollout to finish, Ready again", rolled, TIMEOUT)
    assert ("Progressing", "RollingOut") in seen, f"phases seen: {seen}"
    after = {p.metadata.name: p.metadata.uid for p in caches.live_pods(name)}
    assert set(after) == set(before) and not set(after.values()) & set(before.values())
    for ep in endpoints(status):  # the new flag reached every server
        assert stats(ep, "settings")["maxconns"] == "2048"
    # The operator wrote only the status: no bookkeeping of kopf's on the user's object.
    annotations = caches.get(name)["metadata"].get("annotations") or {}
    assert not [k for k in annotations if "kopf" in k or k.startswith("cache.appliance.io/")]


def test_killed_server_is_restarted_degraded_then_ready(caches, agent):
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest, replicas=2)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=2)
    victim = next(e for e in endpoints(status) if e.pod.endswith("-1"))
    memcached_roundtrip(victim, "lost-on-restart", b"x")
    pod = caches.core.read_namespaced_pod(victim.pod, caches.namespace)
    pid = pid_of(pod)

    os.kill(pid, signal.SIGKILL)
    status = caches.wait(name, "phase Degraded", lambda s: s.get("phase") == "Degraded", TIMEOUT)
    degraded = conditions(status)["Degraded"]
    assert degraded[:2] == ("True", "PodsRestarted"), degraded
    assert victim.pod in degraded[2] and "exit code 137" in degraded[2], degraded

    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=2)
    pod = caches.core.read_namespaced_pod(victim.pod, caches.namespace)
    assert pod.status.container_statuses[0].restart_count == 1
    assert pid_of(pod) != pid
    assert ("Warning", "PodsRestarted") in events_of(caches, name)
    # Back in the endpoints, serving, with an empty cache (it is a cache).
    (back,) = [e for e in endpoints(status) if e.pod == victim.pod]
    assert memcached_roundtrip(back, "after-restart", b"y") == b"y"
    from pymemcache.client.base import Client

    mc = Client((back.address, back.port), connect_timeout=3, timeout=3)
    try:
        assert mc.get("lost-on-restart") is None
    finally:
        mc.close()


def test_operator_killed_mid_reconcile_converges_and_deletion_removes_everything(caches, operator):
    """The operator is frozen the moment its first StatefulSet appears (so mid-pass:
    the status is not written yet), then SIGKILLed; the kubelet starts it again."""
    manifest = load_manifest(product.EXAMPLES / "cachecluster-partition.yaml")
    name = manifest["metadata"]["name"]
    apps = caches.apps
    since = apps.list_namespaced_stateful_set(caches.namespace).metadata.resource_version
    caches.create(manifest)
    restarts = operator.restart_count()
    frozen_at = None
    stream = watch.Watch()
    for event in stream.stream(
        apps.list_namespaced_stateful_set,
        caches.namespace,
        resource_version=since,
        timeout_seconds=60,
    ):
        if event["type"] == "ADDED":
            operator.pause()
            frozen_at = time.monotonic()
            stream.stop()
    assert frozen_at is not None, "no StatefulSet appeared within 60 s"
    try:
        frozen = caches.get(name)
        assert "observedGeneration" not in (frozen.get("status") or {}), (
            "the operator had finished its pass before it was frozen: not mid-reconcile"
        )
        partial = caches.children(name)
    finally:
        operator.kill()
    assert any(c.startswith("StatefulSet/") for c in partial), partial

    started = time.monotonic()
    wait_for(
        "the kubelet to restart the killed operator",
        lambda: operator.restart_count() > restarts and operator.ready(),
        TIMEOUT,
    )
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=6)
    converged = time.monotonic() - started
    expected = sorted(
        [
            f"ConfigMap/{name}-config",
            f"PodDisruptionBudget/{name}",
            f"Service/{name}",
            f"Service/{name}-discovery",
            f"Service/{name}-headless",
            *(f"StatefulSet/{name}-p{p}" for p in (1, 2, 3)),
            *(f"Pod/{name}-p{p}-{i}" for p in (1, 2, 3) for i in (0, 1)),
        ]
    )
    assert caches.children(name) == expected, f"after {converged:.1f}s"
    eps = endpoints(status)
    assert len({(e.address, e.port) for e in eps}) == len(eps) == 6
    for child in (*caches.statefulsets(name), *caches.live_pods(name)):
        owners = child.metadata.owner_references or []
        assert len([o for o in owners if o.controller]) == 1, child.metadata.name

    # Deletion is the garbage collector's (kube-controller-manager): no finalizer waits
    # for the operator, and every child goes, processes included.
    assert not caches.get(name)["metadata"].get("finalizers")
    caches.delete(name)
    deadline = time.monotonic() + TIMEOUT
    while caches.children(name) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert caches.children(name) == [], "children outlived their CacheCluster"
    listing = caches.custom.list_namespaced_custom_object(GROUP, VERSION, caches.namespace, PLURAL)
    assert not listing["items"]
    for ep in eps:
        try:
            memcached_roundtrip(ep, "gone", b"?")
        except OSError:
            continue
        raise AssertionError(f"{ep.pod} at {ep.address}:{ep.port} still answers")


def test_memory_limit_reaches_the_server(caches, agent):
    """The pod's memory limit becomes its container's cgroup limit (the kubelet's), which the
    server reads (-m auto) and sizes its cache below, leaving headroom."""
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    limit = 256 * 1024 * 1024
    caches.create(manifest, replicas=1, resources={"cpu": 1, "memory": "256Mi"})
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=1)
    (ep,) = endpoints(status)
    settings = stats(ep, "settings")
    assert settings["memory_sizing"] == "auto"
    assert int(settings["memory_limit"]) == limit, settings
    # Read from the container's own cgroup, the one the kubelet made for it.
    kind = settings["memory_limit_source"].partition(":")[0]
    assert kind in ("cgroup1", "cgroup2"), settings["memory_limit_source"]
    (pod,) = caches.live_pods(name)
    cgroup = container_cgroup(pod)
    name_on_host = "memory.max" if kind == "cgroup2" else "memory.limit_in_bytes"
    assert int((cgroup / name_on_host).read_text()) == limit
    assert 0 < int(settings["maxbytes"]) < limit
    assert int(settings["maxbytes"]) == int(settings["memory_capacity"])


def test_appliance_pod_is_guaranteed_pinned_read_only_and_unprivileged(
    caches, agent, tools, cluster
):
    """What the operator asks of the kubelet, checked on the kubelet's own work: Guaranteed
    QoS, the process bound to the one CPU the static CPU manager gave it exclusively (the
    kubelet's checkpoint says so), a read-only root file system, uid 10001, and the server
    sized from the container's own cgroup."""
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest, replicas=1)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=1)
    (ep,) = endpoints(status)
    (pod,) = caches.live_pods(name)
    assert pod.status.qos_class == "Guaranteed"
    pid = pid_of(pod)
    proc_status = dict(
        line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    assert proc_status["Cpus_allowed_list"].strip() == "1", proc_status["Cpus_allowed_list"]
    assert proc_status["Uid"].split()[:2] == ["10001", "10001"], proc_status["Uid"]
    checkpoint = json.loads(
        (agent.node(pod.spec.node_name).paths.kubelet_root / "cpu_manager_state").read_text()
    )
    container = pod.spec.containers[0].name
    assert checkpoint["entries"][pod.metadata.uid][container] == "1", checkpoint
    assert checkpoint["defaultCpuSet"] == "0", "CPU 1 is no longer in the shared pool"
    write = subprocess.run(
        [str(tools / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "exec", "-n",
         caches.namespace, pod.metadata.name, "--", "touch", "/written"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write
    settings = stats(ep, "settings")
    cgroup = container_cgroup(pod)
    own = next(f for f in (cgroup / "memory.limit_in_bytes", cgroup / "memory.max") if f.exists())
    assert int(settings["memory_limit"]) == int(own.read_text()) == 1024**3, settings
