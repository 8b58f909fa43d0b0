"""Helpers for the operator's unit tests: specs, and pod/StatefulSet dicts shaped like the
API server's answers. (Not conftest.py: server/tests may have one, and a plain module
name of our own cannot clash with it.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from cacheoperator.models import CacheClusterSpec, parse_spec
from cacheoperator.naming import ClusterRef

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
CRDS = REPO / "crds"
UID = "0b6f3c1e-5a1d-4f43-9a55-6b0b7e2a1c01"


def spec_of(**fields: Any) -> CacheClusterSpec:
    return parse_spec("demo", fields)


REF = ClusterRef(name="demo", namespace="cache", uid=UID)


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


def make_pod(
    name: str,
    *,
    ready: bool = True,
    node: str | None = "node-1",
    host_ip: str = "10.0.0.1",
    pod_ip: str | None = None,
    host_network: bool = True,
    workers: int = 1,
    port: int = 11211,
    udp_port: int | None = None,
    partition: int | None = None,
    unschedulable: str | None = None,
    waiting: str | None = None,
    restarted: int | None = None,
    said: str | None = None,
    deleting: bool = False,
    namespace: str = "cache",
    cluster: str | None = "demo",
    requires_labels: tuple[str, ...] = (),
    node_selector: dict[str, str] | None = None,
    cpu: int | str = 1,
) -> dict[str, Any]:
    """A pod as the API server would return it, reduced to what the operator reads.
    `cluster=None` makes a pod that is no appliance (no cluster label) with the same ports;
    `requires_labels` are node labels its required node affinity asks for (as placement's)."""
    labels = {"cache.appliance.io/cluster": cluster} if cluster else {}
    if partition is not None:
        labels["cache.appliance.io/partition"] = str(partition)
    ports = [{"name": f"tcp-{i}", "containerPort": port + i} for i in range(workers)]
    if udp_port is not None:
        ports += [
            {"name": f"udp-{i}", "containerPort": udp_port + i, "protocol": "UDP"}
            for i in range(workers)
        ]
    ports.append({"name": "metrics", "containerPort": port + 10000})
    conditions = []
    status: dict[str, Any] = {"phase": "Running" if node else "Pending"}
    if unschedulable:
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        )
    elif node:
        conditions.append({"type": "PodScheduled", "status": "True"})
        status["hostIP"] = host_ip
        status["podIP"] = pod_ip or host_ip
    # node=None and no verdict: just created, the scheduler has not looked at it yet.
    conditions.append({"type": "Ready", "status": "True" if ready else "False"})
    status["conditions"] = conditions
    if waiting:
        status["containerStatuses"] = [
            {"name": "cacheserver", "state": {"waiting": {"reason": waiting, "message": "boom"}}}
        ]
    if restarted is not None:
        # The container exited with code `restarted` (137: SIGKILL) and runs again.
        status["containerStatuses"] = [
            {
                "name": "cacheserver",
                "ready": ready,
                "restartCount": 1,
                "state": {"running": {"startedAt": "2030-01-01T00:00:01Z"}},
                "lastState": {"terminated": {"exitCode": restarted, "reason": "Error"}},
            }
        ]
    if said is not None:
        # The termination message of the container's last run (`waiting` or `restarted`).
        (container_status,) = status["containerStatuses"]
        container_status["lastState"] = {
            "terminated": {"exitCode": restarted or 2, "reason": "Error", "message": said}
        }
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if deleting:
        metadata["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    resources = {"cpu": cpu, "memory": "1Gi"}
    spec: dict[str, Any] = {
        "hostNetwork": host_network,
        "containers": [
            {
                "name": "cacheserver",
                "ports": ports,
                "resources": {"requests": resources, "limits": dict(resources)},
            }
        ],
    }
    if node and not unschedulable:
        spec["nodeName"] = node
    if node_selector:
        spec["nodeSelector"] = dict(node_selector)
    if requires_labels:
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {"key": k, "operator": "Exists"} for k in requires_labels
                            ]
                        }
                    ]
                }
            }
        }
    return {"metadata": metadata, "spec": spec, "status": status}


def make_statefulset(
    name: str,
    replicas: int,
    *,
    ready: int | None = None,
    generation: int = 1,
    observed: int | None = None,
    current: str = "rev-1",
    update: str = "rev-1",
    updated: int | None = None,
    created: int | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "namespace": "cache",
            "generation": generation,
            "uid": f"uid-{name}",
            "ownerReferences": [{"uid": UID, "controller": True}],
        },
        "spec": {"replicas": replicas},
        "status": {
            "observedGeneration": generation if observed is None else observed,
            "replicas": replicas if created is None else created,
            "readyReplicas": replicas if ready is None else ready,
            "updatedReplicas": replicas if updated is None else updated,
            "currentRevision": current,
            "updateRevision": update,
        },
    }


def walk_schema(node: dict[str, Any], path: str = ""):
    """(path, node) for every node of an OpenAPI schema, e.g. ".placement.partitions"."""
    yield path, node
    for name, sub in (node.get("properties") or {}).items():
        yield from walk_schema(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from walk_schema(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk_schema(node["additionalProperties"], f"{path}.*")


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def server_container(statefulset: dict[str, Any]) -> dict[str, Any]:
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    return container


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value, or the valueFrom source for downward-API variables."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}
