"""CacheClusters on the e2e cluster, seen as a user sees them: the object and its status,
its pods and the nodes they run on, and memcached traffic to the endpoints in the status."""

from __future__ import annotations

import copy
import random
import shlex
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e.base import ClusterError
from e2e.nodes import container_main_pid

GROUP, VERSION, PLURAL = "cache.appliance.io", "v1alpha1", "cacheclusters"
LABEL_CLUSTER = "cache.appliance.io/cluster"
LABEL_PARTITION = "cache.appliance.io/partition"


def load_manifest(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


class CacheClusters:
    """The CacheCluster API of one namespace, through the admin's client."""

    def __init__(self, api_client, namespace: str) -> None:
        from kubernetes import client

        self.api = api_client
        self.namespace = namespace
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)

    # ---- the object ---------------------------------------------------------------------

    def create(self, manifest: Mapping[str, Any], **overrides: Any) -> dict[str, Any]:
        body = copy.deepcopy(dict(manifest))
        body["spec"] = {**body.get("spec", {}), **overrides}
        return self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )

    def get(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )

    def patch_spec(self, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, {"spec": dict(spec)}
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def status(self, name: str) -> dict[str, Any]:
        return self.get(name).get("status") or {}

    # ---- what it owns -------------------------------------------------------------------

    def pods(self, name: str) -> list:
        return self.core.list_namespaced_pod(
            self.namespace, label_selector=f"{LABEL_CLUSTER}={name}"
        ).items

    def live_pods(self, name: str) -> list:
        return [p for p in self.pods(name) if not p.metadata.deletion_timestamp]

    def statefulsets(self, name: str) -> list:
        return self.apps.list_namespaced_stateful_set(
            self.namespace, label_selector=f"{LABEL_CLUSTER}={name}"
        ).items

    def children(self, name: str) -> list[str]:
        """Every object that belongs to the cluster, as kind/name (empty once it is gone)."""
        from kubernetes import client

        selector = f"{LABEL_CLUSTER}={name}"
        ns = self.namespace
        policy = client.PolicyV1Api(self.api)
        found = []
        for kind, items in (
            ("StatefulSet", self.apps.list_namespaced_stateful_set(ns, label_selector=selector)),
            ("Pod", self.core.list_namespaced_pod(ns, label_selector=selector)),
            ("Service", self.core.list_namespaced_service(ns, label_selector=selector)),
            ("ConfigMap", self.core.list_namespaced_config_map(ns, label_selector=selector)),
            (
                "PodDisruptionBudget",
                policy.list_namespaced_pod_disruption_budget(ns, label_selector=selector),
            ),
        ):
            found += [f"{kind}/{o.metadata.name}" for o in items.items]
        return sorted(found)

    def node_labels(self) -> dict[str, dict[str, str]]:
        return {n.metadata.name: n.metadata.labels or {} for n in self.core.list_node().items}

    # ---- waiting ------------------------------------------------------------------------

    def wait(
        self,
        name: str,
        what: str,
        check: Callable[[dict[str, Any]], object],
        timeout: float = 120,
    ) -> dict[str, Any]:
        """Poll the cluster's status until ``check(status)`` holds; on time-out say what
        the status and the pods were."""
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while True:
            status = self.status(name)
            if check(status):
                return status
            if time.monotonic() >= deadline:
                raise ClusterError(
                    f"timed out after {timeout:.0f}s waiting for CacheCluster "
                    f"{self.namespace}/{name}: {what}\n{self.describe(name, status)}"
                )
            time.sleep(0.5)

    def wait_phase(
        self, name: str, phase: str, timeout: float = 120, replicas: int | None = None
    ) -> dict[str, Any]:
        """Until the status has ``phase`` for the current generation (and, if given, that
        many ready replicas)."""

        def reached(status: dict[str, Any]) -> bool:
            generation = self.get(name)["metadata"]["generation"]
            return (
                status.get("phase") == phase
                and status.get("observedGeneration") == generation
                and (replicas is None or status.get("readyReplicas") == replicas)
            )

        want = f"phase {phase}" + (f" with {replicas} ready" if replicas is not None else "")
        return self.wait(name, want, reached, timeout)

    def describe(self, name: str, status: Mapping[str, Any]) -> str:
        lines = [f"phase={status.get('phase')} ready={status.get('readyReplicas')}"]
        for c in status.get("conditions") or []:
            lines.append(f"  {c['type']}={c['status']} {c['reason']}: {c.get('message', '')}")
        try:
            for pod in self.pods(name):
                lines.append(
                    f"  pod {pod.metadata.name} on {pod.spec.node_name}: "
                    f"{pod.status.phase} ready={is_ready(pod)}"
                )
        except Exception as e:
            lines.append(f"  (pods unknown: {e})")
        return "\n".join(lines)


def conditions(status: Mapping[str, Any]) -> dict[str, tuple[str, str, str]]:
    """type -> (status, reason, message) of a CacheCluster's status."""
    return {
        c["type"]: (c["status"], c["reason"], c.get("message", ""))
        for c in status.get("conditions") or []
    }


def kubectl(tools: Path, cluster, *args: str) -> str:
    """The pinned kubectl on the cluster's kubeconfig; fails the test if it fails."""
    result = subprocess.run(
        [str(tools / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def wait_phase(api_client, namespace: str, name: str, phase: str, timeout: float) -> dict:
    return CacheClusters(api_client, namespace).wait_phase(name, phase, timeout)


# ---- endpoints and traffic -------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    pod: str
    node: str
    address: str
    port: int
    udp_port: int | None
    worker: int
    partition: int | None
    zone: str | None
    rack: str | None

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> Endpoint:
        return cls(
            pod=raw["pod"],
            node=raw["node"],
            address=raw["address"],
            port=int(raw["port"]),
            udp_port=raw.get("udpPort"),
            worker=int(raw.get("worker", 0)),
            partition=raw.get("partition"),
            zone=raw.get("zone"),
            rack=raw.get("rack"),
        )


def endpoints(status: Mapping[str, Any]) -> list[Endpoint]:
    return [Endpoint.from_status(e) for e in status.get("endpoints") or []]


def memcached_roundtrip(endpoint: Endpoint, key: str, value: bytes) -> bytes | None:
    """set then get one key on one endpoint with pymemcache (a real client, TCP)."""
    from pymemcache.client.base import Client

    mc = Client((endpoint.address, endpoint.port), connect_timeout=3, timeout=3)
    try:
        mc.set(key, value)
        return mc.get(key)
    finally:
        mc.close()


def stats(endpoint: Endpoint, *args: str) -> dict[str, str]:
    """`stats [args]` of one endpoint, as text keys and values."""
    from pymemcache.client.base import Client

    mc = Client((endpoint.address, endpoint.port), connect_timeout=3, timeout=3)
    try:
        raw = mc.stats(*args)
    finally:
        mc.close()
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in raw.items()
    }


def cluster_config(address: str, port: int, timeout: float = 3.0) -> tuple[int, list[str]]:
    """ElastiCache's `config get cluster` on one appliance: the version and the nodes
    (host|ip|port) it serves, in its order. The byte count is checked as a client would."""
    with socket.create_connection((address, port), timeout=timeout) as sock:
        sock.sendall(b"config get cluster\r\n")
        data = b""
        while not data.endswith(b"\r\nEND\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ClusterError(f"{address}:{port} closed the connection: {data!r}")
            data += chunk
    header, _, rest = data.partition(b"\r\n")
    words = header.split(b" ")
    if words[:3] != [b"CONFIG", b"cluster", b"0"] or len(words) != 4:
        raise ClusterError(f"{address}:{port}: not a config reply: {data!r}")
    size = int(words[3])
    if rest[size:] != b"\r\nEND\r\n":
        raise ClusterError(f"{address}:{port}: the byte count {size} is wrong: {data!r}")
    version, nodes = rest[:size].decode().split("\n")[:2]
    return int(version), nodes.split(" ") if nodes else []


def udp_request(address: str, port: int, command: bytes, timeout: float = 2.0) -> bytes:
    """One request in memcached's UDP framing (request id, sequence 0 of 1), one reply
    datagram back; retried a few times, as UDP clients do."""
    request_id = random.randrange(1 << 16)
    frame = struct.pack("!HHHH", request_id, 0, 1, 0) + command
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        for attempt in range(3):
            sock.sendto(frame, (address, port))
            try:
                data, _ = sock.recvfrom(65536)
            except TimeoutError:
                if attempt == 2:
                    raise
                continue
            if struct.unpack("!H", data[:2])[0] == request_id:
                return data[8:]
    raise AssertionError("unreachable")


def is_ready(pod) -> bool:
    """Whether a pod (the API client's V1Pod) has its Ready condition."""
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def pid_of(pod) -> int:
    """The host pid of the pod's (first) container's main process, found through the
    container's cgroup on its node."""
    return container_main_pid(pod)


def process_env(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e)


def describe_endpoints(name: str, status: Mapping[str, Any]) -> str:
    """What `make up` prints: the endpoints and a one-line way to talk to the first."""
    eps = endpoints(status)
    if not eps:
        return f"CacheCluster {name} has no endpoints yet"
    lines = [f"\nEndpoints of CacheCluster {name} (one shard each; clients hash keys across):"]
    for e in eps:
        where = ", ".join(x for x in (e.node, e.zone, e.rack) if x)
        lines.append(f"    {e.address}:{e.port}    {e.pod} ({where})")
    first = eps[0]
    servers = ",".join(f"{e.address}:{e.port}" for e in eps)
    servers_list = ", ".join(f'"{e.address}:{e.port}"' for e in eps)
    script = (
        "from pymemcache.client.hash import HashClient; "
        f"c = HashClient([{servers_list}]); "
        'c.set("hello", "world"); print(c.get("hello"))'
    )
    lines += [
        "\nTalk to it:",
        # bash alone (no nc on a fresh machine): quit makes the server close, so cat ends.
        f"    bash -c 'exec 3<>/dev/tcp/{first.address}/{first.port}; printf "
        '"set hello 0 0 5\\r\\nworld\\r\\nget hello\\r\\nquit\\r\\n" >&3; cat <&3\'',
        f"    .venv/bin/python -c {shlex.quote(script)}",
        f"    memcaslap --servers={servers} --time=5s",
    ]
    return "\n".join(lines)


def placement(eps: Iterable[Endpoint]) -> dict[str, tuple[str, str | None, str | None]]:
    """pod -> (node, zone, rack), from worker 0's endpoint."""
    return {e.pod: (e.node, e.zone, e.rack) for e in eps if e.worker == 0}
