"""Each example CacheCluster in examples/, applied as it is: the real scheduler places its
pods as the strategy promises, the status turns Ready and lists the endpoints, and every
endpoint answers real memcached clients (pymemcache, memcaslap, and UDP where enabled)."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request
from collections import Counter, defaultdict

import pytest

from e2e import product
from e2e.appliance import (
    LABEL_PARTITION,
    Endpoint,
    endpoints,
    load_manifest,
    memcached_roundtrip,
    pid_of,
    process_env,
    udp_request,
)
from servers import memcaslap_totals

READY_TIMEOUT = 180


def check_traffic(eps: list[Endpoint], tag: str) -> None:
    """Every endpoint is a shard of its own: what is set on one is there and not on another;
    a hashing client spreads keys over all of them; memcaslap runs without a miss."""
    for i, ep in enumerate(eps):
        value = f"{tag}:{ep.pod}:{ep.worker}".encode()
        assert memcached_roundtrip(ep, f"{tag}-{i}", value) == value, ep
    if len(eps) > 1:
        from pymemcache.client.base import Client

        other = Client((eps[1].address, eps[1].port), connect_timeout=3, timeout=3)
        try:
            assert other.get(f"{tag}-0") is None, "two endpoints share one keyspace"
        finally:
            other.close()

    from pymemcache.client.hash import HashClient

    hashing = HashClient([(e.address, e.port) for e in eps], connect_timeout=3, timeout=3)
    try:
        keys = {f"{tag}-hashed-{n}": str(n).encode() for n in range(200)}
        hashing.set_many(keys)
        assert hashing.get_many(list(keys)) == keys
    finally:
        hashing.close()

    memcaslap = shutil.which("memcaslap")
    if memcaslap is None:
        pytest.fail("memcaslap is missing: scripts/bootstrap.sh installs libmemcached-tools")
    servers = ",".join(f"{e.address}:{e.port}" for e in eps)
    result = subprocess.run(
        [memcaslap, "-s", servers, "-T", "1", "-c", "16", "-t", "2s"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    totals = memcaslap_totals(output)
    assert totals.get("cmd_get", 0) > 100 and totals.get("cmd_set", 0) > 10, output
    assert totals.get("get_misses") == 0, output


def apply_example(
    caches, filename: str, spec_overrides: dict | None = None
) -> tuple[str, dict, list[Endpoint]]:
    manifest = load_manifest(product.EXAMPLES / filename)
    manifest["spec"].update(spec_overrides or {})
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    caches.create(manifest)
    status = caches.wait_phase(name, "Ready", READY_TIMEOUT, replicas=spec["replicas"])
    eps = endpoints(status)
    workers = spec.get("workers", 1)
    assert len(eps) == spec["replicas"] * workers, status
    assert len({(e.address, e.port) for e in eps}) == len(eps), "an endpoint is listed twice"
    # The endpoints tell the truth about where the pods are.
    pods = {p.metadata.name: p for p in caches.live_pods(name)}
    assert set(pods) == {e.pod for e in eps}
    labels = caches.node_labels()
    for e in eps:
        pod = pods[e.pod]
        assert e.node == pod.spec.node_name and e.address == pod.status.host_ip
        assert e.zone == labels[e.node]["topology.kubernetes.io/zone"]
        assert e.rack == labels[e.node]["topology.cache.appliance.io/rack"]
    # The ConfigMap clients may read instead of the status says the same.
    config = caches.core.read_namespaced_config_map(f"{name}-config", caches.namespace)
    assert config.data["servers"].split() == [f"{e.address}:{e.port}" for e in eps]
    return name, spec, eps


# Every node here is one machine's 2 CPUs with CPU 0 reserved: the static CPU manager has one
# CPU to give per node, so the `cluster` example's 2 pinned cores cannot fit. Its placement
# and its two workers are what this test is about; it runs them on one (exclusive) core.
ONE_CORE = {"resources": {"cpu": 1, "memory": "2Gi"}, "pinning": False}


def test_cluster_strategy_packs_one_zone_and_serves_tcp_and_udp(caches):
    _, _, eps = apply_example(caches, "cachecluster-cluster.yaml", ONE_CORE)
    pods = {e.pod: e for e in eps if e.worker == 0}
    assert len({e.node for e in pods.values()}) == 3, "host ports allow one appliance per node"
    assert len({e.zone for e in pods.values()}) == 1, f"not one zone: {pods}"
    # It prefers one rack; the racks here hold two nodes each, so two pods share one.
    assert max(Counter(e.rack for e in pods.values()).values()) == 2, pods
    # Two shard-per-core workers per pod, on consecutive ports, each its own endpoint.
    assert sorted({(e.worker, e.port, e.udp_port) for e in eps}) == [
        (0, 11211, 11211),
        (1, 11212, 11212),
    ]
    check_traffic(eps, "cluster")
    for ep in eps:  # memcached's UDP protocol on each worker's UDP port: the same shard
        memcached_roundtrip(ep, "by-udp", ep.pod.encode())
        reply = udp_request(ep.address, ep.udp_port or 0, b"get by-udp\r\n")
        assert reply == b"VALUE by-udp 0 %d\r\n%s\r\nEND\r\n" % (len(ep.pod), ep.pod.encode())


def test_spread_strategy_puts_each_pod_on_its_own_host(caches):
    _, spec, eps = apply_example(caches, "cachecluster-spread.yaml")
    nodes = [e.node for e in eps]
    assert len(set(nodes)) == len(nodes) == 6, f"two appliances share a host: {nodes}"
    per_zone = Counter(e.zone for e in eps)
    assert max(per_zone.values()) <= spec["placement"]["maxPerZone"]
    # Spread as evenly as the nodes allow (8 nodes, 4 per zone): 3 and 3.
    assert sorted(per_zone.values()) == [3, 3], per_zone
    check_traffic(eps, "spread")


def test_partition_strategy_gives_each_partition_racks_of_its_own(caches, operator):
    name, spec, eps = apply_example(caches, "cachecluster-partition.yaml")
    partitions = spec["placement"]["partitions"]
    racks: dict[int, set[str]] = defaultdict(set)
    for e in eps:
        assert e.partition is not None and e.rack is not None, e
        racks[e.partition].add(e.rack)
    assert sorted(racks) == list(range(1, partitions + 1))
    assert Counter(e.partition for e in eps) == {p: 2 for p in range(1, partitions + 1)}
    for p, mine in racks.items():
        others = set().union(*(r for q, r in racks.items() if q != p))
        assert not mine & others, f"partition {p} shares a rack with another: {dict(racks)}"
    statefulsets = sorted(s.metadata.name for s in caches.statefulsets(name))
    assert statefulsets == [f"{name}-p{p}" for p in range(1, partitions + 1)]
    # Each server process knows its partition, like EC2 instance metadata.
    for pod in caches.live_pods(name):
        env = process_env(pid_of(pod))
        assert env["CACHESERVER_PARTITION"] == pod.metadata.labels[LABEL_PARTITION]
    check_traffic(eps, "partition")
    # The operator counted its passes (its own /metrics, scraped as Prometheus would).
    with urllib.request.urlopen(operator.metrics_url, timeout=5) as reply:
        metrics = reply.read().decode()
    samples = {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line and not line.startswith("#")
    }
    assert samples['cacheoperator_clusters{phase="Ready"}'] >= 1
    assert samples['cacheoperator_reconciles_total{result="ok"}'] >= 1
