"""Many CacheClusters on shared nodes, and the truth about each, as a user sees it:
clusters on different ports share nodes; one that reuses a port on the same nodes reports
PortConflict naming the other cluster and the port, while the same port on other nodes is
no conflict; each endpoint shows the CPUs its appliance runs on and `Pinned` says whether
they are its own; 64Mi runs, less is refused when applied, and a failing appliance's own
reason reaches `kubectl describe cc`. The operator is the one beside the cluster, with the
chart's RBAC."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.request

import pytest

from e2e import product
from e2e.appliance import (
    conditions,
    endpoints,
    kubectl,
    load_manifest,
    memcached_roundtrip,
    stats,
)
from e2e.nodes import HOSTNAME_LABEL, SHARED_CPUS_TAINT, ZONE_LABEL

DEFAULT = product.EXAMPLES / "cachecluster.yaml"  # 3 appliances, every default
TIMEOUT = 120
CPU_LIST = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
# Small appliances that do not ask for whole CPUs, so two fit on one node's allocatable.
SMALL = {"pinning": False, "resources": {"cpu": "200m", "memory": "128Mi"}}


def zone_with_most_nodes(caches) -> tuple[str, list[str]]:
    by_zone: dict[str, list[str]] = {}
    for node, labels in caches.node_labels().items():
        if ZONE_LABEL in labels:
            by_zone.setdefault(labels[ZONE_LABEL], []).append(node)
    if not by_zone:
        pytest.skip(f"no node is labelled {ZONE_LABEL}")
    zone = max(sorted(by_zone), key=lambda z: len(by_zone[z]))
    return zone, sorted(by_zone[zone])


def nodes_of(caches, name: str) -> set[str]:
    return {p.spec.node_name for p in caches.live_pods(name) if p.spec.node_name}


def test_clusters_on_different_ports_share_nodes_and_a_reused_port_is_a_named_conflict(
    caches, tools, cluster
):
    manifest = load_manifest(DEFAULT)
    zone, nodes = zone_with_most_nodes(caches)
    here = {"nodeSelector": {ZONE_LABEL: zone}, "replicas": len(nodes), **SMALL}

    # Two clusters that differ only in port: one appliance on every node of the zone each.
    first = {**manifest, "metadata": {"name": "first"}}
    second = {**manifest, "metadata": {"name": "second"}}
    caches.create(first, port=11211, **here)
    caches.create(second, port=11311, **here)
    one = caches.wait_phase("first", "Ready", TIMEOUT, replicas=len(nodes))
    two = caches.wait_phase("second", "Ready", TIMEOUT, replicas=len(nodes))
    assert nodes_of(caches, "first") == nodes_of(caches, "second") == set(nodes)
    for status, port in ((one, 11211), (two, 11311)):
        for ep in endpoints(status):
            assert ep.port == port
            assert memcached_roundtrip(ep, f"on-{port}", b"x") == b"x"
            # The metrics port follows the TCP port: port + 10000.
            url = f"http://{ep.address}:{port + 10000}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                assert "memcached_up" in reply.read().decode()

    # A third on the first one's port, on the same nodes: nowhere to go, and it says why.
    third = {**manifest, "metadata": {"name": "third"}}
    caches.create(third, port=11211, **{**here, "replicas": 1})
    status = caches.wait(
        "third",
        "Degraded with reason PortConflict",
        lambda s: conditions(s).get("Degraded", ("", "", ""))[1] == "PortConflict",
        TIMEOUT,
    )
    message = conditions(status)["Degraded"][2]
    assert f"11211/TCP and 21211/TCP held by CacheCluster {caches.namespace}/first" in message
    assert "didn't have free ports" in message  # the scheduler's own words
    assert "second" not in message  # the cluster on another port holds nothing it needs
    described = kubectl(tools, cluster, "describe", "cc", "third", "-n", caches.namespace)
    assert "PortConflict" in described and f"CacheCluster {caches.namespace}/first" in described


def test_the_same_port_on_other_nodes_is_no_conflict(caches):
    zones: dict[str, list[str]] = {}
    for node, labels in caches.node_labels().items():
        if ZONE_LABEL in labels:
            zones.setdefault(labels[ZONE_LABEL], []).append(node)
    if len(zones) < 2:
        pytest.skip("needs nodes in two zones")
    zone_a, zone_b = sorted(zones)[:2]
    manifest = load_manifest(DEFAULT)
    for name, zone in (("west", zone_a), ("east", zone_b)):
        body = {**manifest, "metadata": {"name": name}}
        caches.create(body, port=11211, replicas=1, nodeSelector={ZONE_LABEL: zone}, **SMALL)
    for name in ("west", "east"):
        status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=1)
        assert conditions(status)["Degraded"][:2] == ("False", "AsExpected")


def test_the_example_cluster_reports_its_cpus_and_is_pinned(caches, tools, cluster):
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest)
    caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)
    status = caches.wait(
        name,
        "condition Pinned to be decided",
        lambda s: conditions(s).get("Pinned", ("Unknown",))[0] != "Unknown",
        TIMEOUT,
    )
    pinned = conditions(status)["Pinned"]
    assert pinned[:2] == ("True", "Exclusive"), pinned
    raw = status["endpoints"]
    assert len(raw) == 3
    for entry in raw:
        assert CPU_LIST.match(entry["cpus"]) and "," not in entry["cpus"], entry
        assert "-" not in entry["cpus"], entry  # one worker, pinned to one CPU
        assert entry["memoryLimit"] == "1Gi", entry
        assert entry["memoryLimitSource"].startswith("cgroup"), entry
    # The appliance says the same itself.
    for ep in endpoints(status):
        (entry,) = [e for e in raw if e["pod"] == ep.pod]
        assert stats(ep, "settings")["cpus"] == entry["cpus"]
    listing = kubectl(tools, cluster, "get", "cc", name, "-n", caches.namespace)
    assert "PINNED" in listing.splitlines()[0] and "True" in listing.splitlines()[1]


def test_a_cluster_without_exclusive_cpus_is_not_pinned_and_names_its_pods(caches, shared_cpu_node):
    """On a node whose kubelet runs no CPU manager policy (cpuManagerPolicy none), the
    appliance may run on every CPU: Pinned is False and names it."""
    node = shared_cpu_node
    config = json.loads(
        caches.core.connect_get_node_proxy_with_path(node, "configz", _preload_content=False).data
    )
    assert config["kubeletconfig"]["cpuManagerPolicy"] == "none", config["kubeletconfig"]
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(
        manifest,
        replicas=1,
        nodeSelector={HOSTNAME_LABEL: node},
        tolerations=[{"key": SHARED_CPUS_TAINT["key"], "operator": "Exists"}],
    )
    caches.wait_phase(name, "Ready", TIMEOUT, replicas=1)
    status = caches.wait(
        name,
        "condition Pinned to be decided",
        lambda s: conditions(s).get("Pinned", ("Unknown",))[0] != "Unknown",
        TIMEOUT,
    )
    pinned = conditions(status)["Pinned"]
    assert pinned[:2] == ("False", "NotExclusive"), pinned
    (pod,) = caches.live_pods(name)
    assert f"({pod.metadata.name})" in pinned[2]
    assert f"may run on every CPU of {node}" in pinned[2]
    assert "cpuManagerPolicy: static" in pinned[2]
    events = caches.core.list_namespaced_event(
        caches.namespace, field_selector=f"involvedObject.name={name}"
    )
    assert ("Warning", "NotExclusive") in [(e.type, e.reason) for e in events.items]


def test_64mi_runs_and_less_is_refused_when_applied(caches, tools, cluster):
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest, replicas=1, resources={"cpu": 1, "memory": "64Mi"})
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=1)
    (ep,) = endpoints(status)
    assert memcached_roundtrip(ep, "small", b"fits") == b"fits"
    settings = stats(ep, "settings")
    assert int(settings["memory_limit"]) == 64 * 1024 * 1024
    assert int(settings["memory_headroom"]) == 16 * 1024 * 1024  # a quarter of a small limit
    assert int(settings["memory_capacity"]) > 1024 * 1024

    refused = {**manifest, "metadata": {"name": "tiny", "namespace": caches.namespace}}
    refused["spec"] = {**manifest.get("spec", {}), "resources": {"cpu": 1, "memory": "48Mi"}}
    result = subprocess.run(
        [str(tools / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "apply", "-f", "-"],
        input=json.dumps(refused),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, result.stdout
    assert "spec.resources.memory" in result.stderr
    assert "must be at least 64Mi" in result.stderr and "29 MiB at start" in result.stderr


def test_a_failing_appliance_says_why_in_describe(caches, tools, cluster):
    """64Mi is enough for the defaults, not for 4096 connections: the server refuses to
    start and its reason, not only the kubelet's CrashLoopBackOff, reaches the cluster."""
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(
        manifest, replicas=1, resources={"cpu": 1, "memory": "64Mi"}, extraArgs=["-c", "4096"]
    )
    status = caches.wait(
        name,
        "Degraded with the server's reason",
        lambda s: "cannot size memory" in conditions(s).get("Degraded", ("", "", ""))[2],
        TIMEOUT,
    )
    degraded = conditions(status)["Degraded"]
    assert degraded[1] in ("PodsFailing", "PodsRestarted"), degraded
    assert "the memory limit 64.0 MiB" in degraded[2] and "exit code 2" in degraded[2]
    described = kubectl(tools, cluster, "describe", "cc", name, "-n", caches.namespace)
    assert "cannot size memory: the memory limit 64.0 MiB" in described
