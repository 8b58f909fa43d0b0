"""Warm restart on real nodes: a spec change rolls every appliance of the example cluster
(new pods), and the cache is still there afterwards.

3000 keys are written across the appliances through rendezvous hashing (pymemcache's, as
its HashClient uses it) over the endpoints in the status; a reader keeps reading them
through the rollout. Afterwards a client built from the new endpoints reads at least 95%
of the keys byte-exact, every pod reports in status.appliances what it restored, and the
reader's failures came from one appliance at a time, each for no longer than one restart.

Needs what real kubelets give and the old node agent did not: init containers, hostPath
volumes with subPathExpr, start-up probes, and a /dev/shm (tmpfs) on each node; the
operator must reach the appliances' node addresses (status.appliances).
"""

from __future__ import annotations

import random
import threading
import time
import urllib.request
from collections import defaultdict
from itertools import pairwise

from pymemcache.client.base import Client
from pymemcache.client.rendezvous import RendezvousHash

from cacheoperator.gate import SNAPSHOT_NODE
from e2e import product
from e2e.appliance import endpoints, kubectl, load_manifest

DEFAULT = product.EXAMPLES / "cachecluster.yaml"  # 3 appliances, warm restart on by default
KEYS = 3000
TIMEOUT = 300  # three appliances, each saving, restarting and restoring in turn
# One appliance's restart, from its stop to serving again, for this small cache: its grace
# period is the bound on the save and its start-up probe on the restore; a few seconds here.
ONE_RESTART = 60.0


def value_of(i: int) -> bytes:
    return (b"value-%d-" % i) * (1 + i % 40)


class Shards:
    """Keys hashed across the endpoints, one plain client per endpoint."""

    def __init__(self, status: dict) -> None:
        self.servers = {f"{e.address}:{e.port}": (e.address, e.port) for e in endpoints(status)}
        self.ring = RendezvousHash(nodes=sorted(self.servers))
        self.clients = {
            name: Client(addr, connect_timeout=2, timeout=2, default_noreply=False)
            for name, addr in self.servers.items()
        }

    def server_of(self, key: str) -> str:
        return self.ring.get_node(key)

    def client_of(self, key: str) -> Client:
        return self.clients[self.server_of(key)]

    def close(self) -> None:
        for client in self.clients.values():
            client.close()


class RolloutGauge(threading.Thread):
    """Samples the operator's cacheoperator_rollout_progress of one CacheCluster, as a
    Prometheus scraping the operator would, until stopped."""

    def __init__(self, url: str, namespace: str, name: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.labels = f'cachecluster="{name}",namespace="{namespace}"'
        self.stop = threading.Event()
        self.progress: list[float] = []
        self.in_progress: list[float] = []

    def run(self) -> None:
        while not self.stop.wait(0.5):
            try:
                with urllib.request.urlopen(self.url, timeout=2) as reply:
                    text = reply.read().decode()
            except OSError:
                continue
            for line in text.splitlines():
                for family, out in (
                    ("cacheoperator_rollout_progress", self.progress),
                    ("cacheoperator_rollout_in_progress", self.in_progress),
                ):
                    if line.startswith(f"{family}{{{self.labels}}} "):
                        out.append(float(line.rsplit(" ", 1)[1]))


class Reader(threading.Thread):
    """Reads random keys until stopped; remembers when each server failed."""

    def __init__(self, shards: Shards) -> None:
        super().__init__(daemon=True)
        self.shards = shards
        self.stop = threading.Event()
        self.failures: dict[str, list[float]] = defaultdict(list)
        self.reads = 0

    def run(self) -> None:
        rng = random.Random(7)
        while not self.stop.is_set():
            key = f"warm:{rng.randrange(KEYS)}"
            try:
                self.shards.client_of(key).get(key)
                self.reads += 1
            except Exception:
                self.failures[self.shards.server_of(key)].append(time.monotonic())
                time.sleep(0.05)


def windows(times: list[float], gap: float = 2.0) -> list[tuple[float, float]]:
    """Failure times grouped into windows (failures closer than ``gap`` s are one)."""
    out: list[tuple[float, float]] = []
    for t in sorted(times):
        if out and t - out[-1][1] <= gap:
            out[-1] = (out[-1][0], t)
        else:
            out.append((t, t))
    return out


def test_a_rollout_keeps_the_cache_of_every_appliance(caches, operator):
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=3)
    before = {p.metadata.name: p.metadata.uid for p in caches.live_pods(name)}

    writer = Shards(status)
    try:
        for i in range(KEYS):
            key = f"warm:{i}"
            assert writer.client_of(key).set(key, value_of(i), expire=3600)
    finally:
        writer.close()

    reader = Reader(Shards(status))
    reader.start()
    gauge = RolloutGauge(operator.metrics_url, caches.namespace, name)
    gauge.start()
    try:
        generation = caches.patch_spec(name, {"extraArgs": ["-c", "2048"]})["metadata"][
            "generation"
        ]

        def rolled(s: dict) -> bool:
            if s.get("observedGeneration") != generation or s.get("phase") != "Ready":
                return False
            pods = {p.metadata.name: p.metadata.uid for p in caches.live_pods(name)}
            fresh = set(pods) == set(before) and not set(pods.values()) & set(before.values())
            return fresh and len(s.get("appliances") or []) == 3

        status = caches.wait(name, "every appliance replaced, Ready, restored", rolled, TIMEOUT)
        # (The metrics follow the pass that wrote this status a moment later.)
        settle = time.monotonic() + 15
        while time.monotonic() < settle and (gauge.progress[-1:], gauge.in_progress[-1:]) != (
            [1.0],
            [0.0],
        ):
            time.sleep(0.5)
    finally:
        reader.stop.set()
        reader.join(10)
        gauge.stop.set()
        gauge.join(10)

    # The operator's metrics followed the rollout: progress fell as the new template went
    # out, and came back to 1 with every appliance on it; status.rollout agrees.
    assert gauge.progress and min(gauge.progress) < 1.0 and gauge.progress[-1] == 1.0, (
        gauge.progress
    )
    assert 1.0 in gauge.in_progress and gauge.in_progress[-1] == 0.0, gauge.in_progress
    assert status["rollout"]["updatedReplicas"] == 3 and not status["rollout"].get("timedOut")

    # Every new pod restored its snapshot, and the operator says so.
    restored = {a["pod"]: a for a in status["appliances"]}
    assert {a["warmRestart"] for a in restored.values()} == {"restored"}, status["appliances"]
    assert sum(a.get("restoredItems", 0) for a in restored.values()) >= KEYS * 95 // 100

    # A client built from the new endpoints reads the keys back byte-exact.
    after = Shards(status)
    try:
        exact = sum(
            after.client_of(f"warm:{i}").get(f"warm:{i}") == value_of(i) for i in range(KEYS)
        )
    finally:
        after.close()
    assert exact >= KEYS * 95 // 100, f"{exact} of {KEYS} keys came back"

    # Failures, if any, came from one appliance at a time, each for at most one restart.
    assert reader.reads > 0
    spans = sorted((w, server) for server, ts in reader.failures.items() for w in windows(ts))
    for (start, end), server in spans:
        assert end - start <= ONE_RESTART, f"{server} failed for {end - start:.1f}s"
    for ((_, end1), s1), ((start2, _), s2) in pairwise(spans):
        assert s1 == s2 or start2 >= end1 - 1.0, f"{s1} and {s2} were down at the same time"


def test_an_appliance_drained_off_its_node_starts_empty_elsewhere_and_says_so(
    caches, tools, cluster
):
    """Node memory is node-local (each e2e node has a /dev/shm of its own): an appliance whose
    node is cordoned and whose pod is replaced starts on another node without its snapshot,
    and the status and events say where the snapshot stayed. When it later comes back to
    the node it left, the snapshot still there is older than what it took meanwhile: it is
    not restored."""
    manifest = load_manifest(DEFAULT)
    name = manifest["metadata"]["name"]
    caches.create(manifest, replicas=1)
    status = caches.wait_phase(name, "Ready", TIMEOUT, replicas=1)
    (ep,) = endpoints(status)
    client = Client((ep.address, ep.port), connect_timeout=2, timeout=2, default_noreply=False)
    try:
        for i in range(100):
            assert client.set(f"drained:{i}", value_of(i))
    finally:
        client.close()
    (pod,) = caches.live_pods(name)
    node = pod.spec.node_name
    kubectl(tools, cluster, "cordon", node)
    try:
        # A graceful stop: the server writes its snapshot to its node's memory.
        kubectl(tools, cluster, "delete", "pod", "-n", caches.namespace, pod.metadata.name)

        def moved(s: dict) -> bool:
            pods = caches.live_pods(name)
            return (
                s.get("phase") == "Ready"
                and len(pods) == 1
                and pods[0].metadata.uid != pod.metadata.uid
                and any(a.get("previousNode") == node for a in s.get("appliances") or [])
            )

        status = caches.wait(name, "the appliance Ready on another node", moved, TIMEOUT)
    finally:
        kubectl(tools, cluster, "uncordon", node)
    (start,) = status["appliances"]
    assert start["node"] != node and start["warmRestart"] == "none", start
    start_node = start["node"]
    (ep,) = endpoints(status)
    client = Client((ep.address, ep.port), connect_timeout=2, timeout=2)
    try:
        assert client.get("drained:0") is None, "a snapshot left on another node was used"
    finally:
        client.close()
    events = caches.core.list_namespaced_event(
        caches.namespace, field_selector=f"involvedObject.name={name}"
    )
    assert ("Warning", "Moved") in [(e.type, e.reason) for e in events.items]

    # Newer values on the second node; then back to the first, whose snapshot predates them.
    client = Client((ep.address, ep.port), connect_timeout=2, timeout=2, default_noreply=False)
    try:
        assert client.set("drained:0", b"newer")
    finally:
        client.close()
    (pod,) = caches.live_pods(name)
    others = [n.metadata.name for n in caches.core.list_node().items if n.metadata.name != node]
    for other in others:
        kubectl(tools, cluster, "cordon", other)
    try:
        kubectl(tools, cluster, "delete", "pod", "-n", caches.namespace, pod.metadata.name)

        def back(s: dict) -> bool:
            pods = caches.live_pods(name)
            return (
                s.get("phase") == "Ready"
                and len(pods) == 1
                and pods[0].metadata.uid != pod.metadata.uid
                and any(a.get("node") == node for a in s.get("appliances") or [])
            )

        status = caches.wait(name, "the appliance Ready on its first node again", back, TIMEOUT)
    finally:
        for other in others:
            kubectl(tools, cluster, "uncordon", other)
    (start,) = status["appliances"]
    assert start["warmRestart"] == "none", start  # the old snapshot was removed, not refused
    (ep,) = endpoints(status)
    client = Client((ep.address, ep.port), connect_timeout=2, timeout=2)
    try:
        assert client.get("drained:0") is None, "a snapshot older than the last writes was used"
    finally:
        client.close()
    (back_pod,) = caches.live_pods(name)
    assert back_pod.metadata.annotations[SNAPSHOT_NODE] == start_node
