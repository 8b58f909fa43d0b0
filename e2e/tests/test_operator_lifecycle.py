"""A CacheCluster over its life, as its user sees it: `kubectl scale` up and down, more
replicas than the nodes can take, a spec change rolled pod by pod, a killed server, the
operator killed in the middle of its work, deletion, and the memory limit reaching the
server. The operator is the one beside the cluster, with the chart's RBAC."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
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
    assert operator.alive() and operator.live()
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
    the status is not written yet), then SIGKILLed and started again."""
    manifest = load_manifest(product.EXAMPLES / "cachecluster-partition.yaml")
    name = manifest["metadata"]["name"]
    apps = caches.apps
    since = apps.list_namespaced_stateful_set(caches.namespace).metadata.resource_version
    caches.create(manifest)
    stream = watch.Watch()
    for event in stream.stream(
        apps.list_namespaced_stateful_set,
        caches.namespace,
        resource_version=since,
        timeout_seconds=60,
    ):
        if event["type"] == "ADDED":
            operator.pause()
            stream.stop()
    assert operator.alive(), "no StatefulSet appeared within 60 s"
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
    operator.start()
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=6)
    converged = time.monotonic() - started
    expected = sorted(
        [
            f"ConfigMap/{name}-config",
            f"PodDisruptionBudget/{name}",
            f"Service/{name}",
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
    """The pod's memory limit becomes its cgroup's limit (node agent), which the server
    reads (-m auto) and sizes its cache below, leaving headroom."""
    if agent.cgroups is None:
        pytest.skip(f"the node agent runs pods without cgroups here: {agent.cgroups_error}")
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    limit = 256 * 1024 * 1024
    caches.create(manifest, replicas=1, resources={"cpu": 1, "memory": "256Mi"})
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=1)
    (ep,) = endpoints(status)
    settings = stats(ep, "settings")
    assert settings["memory_sizing"] == "auto"
    assert int(settings["memory_limit"]) == limit, settings
    # Read from the cgroup the node agent made for this pod's container.
    kind, _, where = settings["memory_limit_source"].partition(":")
    assert kind in ("cgroup1", "cgroup2"), settings["memory_limit_source"]
    (pod,) = caches.live_pods(name)
    assert pod.metadata.uid in where, where
    path = Path(where.split(":")[0])
    if path.name in ("memory.limit_in_bytes", "memory.max"):
        assert int(path.read_text()) == limit
    assert 0 < int(settings["maxbytes"]) < limit
    assert int(settings["maxbytes"]) == int(settings["memory_capacity"])
