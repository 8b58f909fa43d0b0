"""Auto discovery on real nodes, as a client of ElastiCache's `config get cluster` sees it:
one address gives every appliance; scaling 3 -> 5 -> 2 changes the list and its version on
every appliance within the documented bound; a restarted appliance keeps the order and the
version; a real auto-discovery client from PyPI finds all appliances and spreads its keys.

The membership reaches the pods as a ConfigMap volume, which the kubelet refreshes at its
pod sync: the bound below assumes the e2e kubelets run with a short syncFrequency."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from e2e import product
from e2e.appliance import cluster_config, endpoints, load_manifest, stats

DEFAULT = product.EXAMPLES / "cachecluster.yaml"  # 3 appliances, spread, one worker each
TIMEOUT = 120
# docs/operator.md: an appliance serves a change at most 1.5 x the kubelet's syncFrequency
# (ConfigMap volume refresh, with its jitter) plus 2 s (its own poll, and the operator's
# pass) after the operator published it.
KUBELET_SYNC_FREQUENCY = 5.0  # the e2e kubelets' setting
BOUND = 1.5 * KUBELET_SYNC_FREQUENCY + 2.0


def published(status: dict) -> tuple[int, list[str]]:
    """What the operator says the appliances serve: the version and host|ip|port in order."""
    discovery = status["discovery"]
    return discovery["version"], [
        f"{n['host']}|{n['address']}|{n['port']}" for n in discovery["nodes"]
    ]


def all_serve(status: dict, started: float) -> float:
    """Wait until every appliance of the status answers `config get cluster` with what the
    status publishes; returns how long that took after ``started``."""
    want = published(status)
    deadline = started + BOUND
    pending = {(e.address, e.port) for e in endpoints(status)}
    while pending:
        pending = {ep for ep in pending if cluster_config(*ep) != want}
        if pending and time.monotonic() > deadline:
            seen = {ep: cluster_config(*ep) for ep in pending}
            raise AssertionError(f"not served within {BOUND}s: want {want}, serving {seen}")
        time.sleep(0.2)
    return time.monotonic() - started


def in_order(name: str, namespace: str, status: dict) -> list[str]:
    """The list the order rule gives: pods by ordinal, with their stable DNS names."""
    eps = sorted(endpoints(status), key=lambda e: (int(e.pod.rsplit("-", 1)[1]), e.worker))
    return [f"{e.pod}.{name}-headless.{namespace}.svc|{e.address}|{e.port}" for e in eps]


def test_one_address_discovers_all_and_scaling_moves_list_and_version(caches, eventually):
    from kubernetes import client

    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)
    all_serve(status, time.monotonic())
    version, nodes = published(status)
    assert nodes == in_order(name, caches.namespace, status)
    # A client configured with one address (any appliance) learns every one of them.
    first = endpoints(status)[0]
    assert cluster_config(first.address, first.port) == (version, nodes)
    assert status["discovery"]["endpoint"] == f"{name}-discovery.{caches.namespace}.svc:11211"
    # The one stable address: the discovery Service, which routes to every ready appliance.
    service = caches.core.read_namespaced_service(f"{name}-discovery", caches.namespace)
    assert [p.port for p in service.spec.ports] == [11211]
    slices = client.DiscoveryV1Api(caches.api)

    def routed() -> set[str]:
        listing = slices.list_namespaced_endpoint_slice(
            caches.namespace, label_selector=f"kubernetes.io/service-name={name}-discovery"
        )
        return {
            address
            for item in listing.items
            for ep in item.endpoints or []
            if ep.conditions and ep.conditions.ready
            for address in ep.addresses
        }

    want = {e.address for e in endpoints(status)}
    eventually("the discovery Service to route to every appliance", lambda: routed() == want)

    for replicas in (5, 2):
        caches.patch_spec(name, {"replicas": replicas})
        status = caches.wait(
            name,
            f"a new membership version with {replicas} appliances",
            lambda s, n=replicas, v=version: (
                s.get("discovery", {}).get("version", 0) > v
                and len(s["discovery"]["nodes"]) == n
                and s.get("readyReplicas") == n
            ),
            TIMEOUT,
        )
        took = all_serve(status, time.monotonic())
        newer, nodes = published(status)
        assert newer > version, (newer, version)
        assert nodes == in_order(name, caches.namespace, status), nodes
        version = newer
        print(f"{replicas} appliances: version {version} served everywhere after {took:.1f}s")

    # Settled: no pass changes the version any more.
    time.sleep(BOUND)
    assert published(caches.status(name)) == (version, nodes)


def test_a_restarted_appliance_keeps_order_and_version(caches, tools: Path, cluster, eventually):
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)
    all_serve(status, time.monotonic())
    before = published(status)
    victim = next(e for e in endpoints(status) if e.pod.endswith("-1"))

    # SIGTERM to the container's first process: the server stops, the kubelet restarts it.
    subprocess.run(
        [str(tools / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "exec", "-n",
         caches.namespace, victim.pod, "--", "python", "-c",
         "import os, signal; os.kill(1, signal.SIGTERM)"],
        capture_output=True, timeout=60, check=False,
    )  # fmt: skip

    def restarted() -> bool:
        # Meanwhile the membership stands still: a restart is not a membership change.
        assert published(caches.status(name)) == before
        pod = caches.core.read_namespaced_pod(victim.pod, caches.namespace)
        return pod.status.container_statuses[0].restart_count >= 1

    eventually(f"{victim.pod}'s server to be restarted", restarted, TIMEOUT)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)
    assert published(status) == before
    # The restarted server read the mounted membership at start: same list, same version.
    assert cluster_config(victim.address, victim.port) == before
    all_serve(status, time.monotonic())


def test_an_elasticache_client_from_pypi_finds_every_appliance_and_spreads_keys(caches):
    from django_elastipymemcache.client import AWSElastiCacheClient

    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)
    all_serve(status, time.monotonic())
    first = endpoints(status)[0]
    client = AWSElastiCacheClient(f"{first.address}:{first.port}", connect_timeout=3, timeout=3)
    try:
        assert sorted(client.clients) == sorted(f"{e.address}:{e.port}" for e in endpoints(status))
        for i in range(300):
            assert client.set(f"spread-{i}", b"v%d" % i)
        assert client.get("spread-42") == b"v42"
    finally:
        client.close()
    items = [int(stats(e)["curr_items"]) for e in endpoints(status)]
    assert sum(items) == 300 and all(n > 30 for n in items), items
