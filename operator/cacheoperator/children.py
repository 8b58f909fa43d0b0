"""Pure builders: a validated spec in, the desired child objects (plain dicts) out.

Nothing here talks to the API server, reads the clock or the environment, so the same
input always gives the same objects; applying them twice changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from cacheoperator.discovery import MEMBERSHIP_KEY, membership_file
from cacheoperator.models import CacheClusterSpec, DiscoveryStatus, Endpoint
from cacheoperator.naming import (
    LABEL_PARTITION,
    LABEL_STATEFULSET,
    ClusterRef,
    client_service_name,
    common_labels,
    configmap_name,
    discovery_service_name,
    headless_service_name,
    pdb_name,
    selector_labels,
    statefulset_name,
)
from cacheoperator.placement import partition_sizes
from cacheoperator.pods import pod_template, server_env
from cacheoperator.rollout import TEMPLATE_HASH, template_hash


def _metadata(ref: ClusterRef, name: str, labels: dict[str, str] | None = None) -> dict:
    return {
        "name": name,
        "namespace": ref.namespace,
        "labels": labels or common_labels(ref.name),
        "ownerReferences": [ref.owner_reference()],
    }


def statefulsets(
    ref: ClusterRef, spec: CacheClusterSpec, default_image: str
) -> list[dict[str, Any]]:
    """One StatefulSet per partition (one in all for cluster and spread)."""
    image = spec.image or default_image
    out = []
    for partition, replicas in partition_sizes(spec):
        name = statefulset_name(ref.name, partition)
        labels = common_labels(ref.name) | {LABEL_STATEFULSET: name}
        if partition is not None:
            labels[LABEL_PARTITION] = str(partition)
        template = pod_template(spec, ref.name, name, image, partition, ref.namespace)
        metadata = _metadata(ref, name, labels)
        # What the operator last gave this StatefulSet: rollouts go one at a time (rollout.py).
        metadata["annotations"] = {TEMPLATE_HASH: template_hash(template)}
        out.append(
            {
                "apiVersion": "apps/v1",
                "kind": "StatefulSet",
                "metadata": metadata,
                "spec": {
                    "replicas": replicas,
                    "serviceName": headless_service_name(ref.name),
                    # A cache has no start-up order to respect: start and stop pods together.
                    "podManagementPolicy": "Parallel",
                    "updateStrategy": {"type": "RollingUpdate"},
                    # Immutable, so it names this StatefulSet only: sets of one cluster never
                    # claim each other's pods when the partitions change.
                    "selector": {
                        "matchLabels": selector_labels(ref.name) | {LABEL_STATEFULSET: name}
                    },
                    "template": template,
                },
            }
        )
    return out


def _service_ports(spec: CacheClusterSpec, with_metrics: bool) -> list[dict[str, Any]]:
    ports = [
        {"name": f"tcp-{i}", "port": spec.port + i, "targetPort": spec.port + i, "protocol": "TCP"}
        for i in range(spec.workers)
    ]
    if spec.udp.enabled:
        ports += [
            {
                "name": f"udp-{i}",
                "port": spec.udp_port + i,
                "targetPort": spec.udp_port + i,
                "protocol": "UDP",
            }
            for i in range(spec.workers)
        ]
    if with_metrics and spec.monitoring.enabled:
        port = spec.metrics_port
        ports.append({"name": "metrics", "port": port, "targetPort": port, "protocol": "TCP"})
    return ports


def headless_service(ref: ClusterRef, spec: CacheClusterSpec) -> dict[str, Any]:
    """Per-pod DNS names (the StatefulSets' service) and a target for metrics scrapers."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, headless_service_name(ref.name)),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector_labels(ref.name),
            "ports": _service_ports(spec, with_metrics=True),
        },
    }


def client_service(ref: ClusterRef, spec: CacheClusterSpec) -> dict[str, Any]:
    """One virtual IP for clients that cannot hash keys; hashing clients use status.endpoints."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, client_service_name(ref.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(ref.name),
            "ports": _service_ports(spec, with_metrics=False),
        },
    }


def discovery_service(ref: ClusterRef, spec: CacheClusterSpec) -> dict[str, Any]:
    """The one address an auto-discovery client is configured with: any appliance behind it
    answers `config get cluster` with the whole membership (worker 0's port is enough)."""
    port = spec.port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(ref, discovery_service_name(ref.name)),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(ref.name),
            "ports": [{"name": "memcached", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def configmap(
    ref: ClusterRef,
    spec: CacheClusterSpec,
    endpoints: Sequence[Endpoint],
    discovery: DiscoveryStatus | None = None,
) -> dict[str, Any]:
    """The server settings, the current endpoint list (for people and for clients), and the
    membership the appliances serve to `config get cluster` (they mount this key)."""
    env = "".join(f"{k}={v}\n" for k, v in server_env(spec).items())
    # Membership only: what the appliances report about themselves would change the
    # ConfigMap (and what clients see) when nothing about the membership did.
    listed = [
        e.model_dump(by_alias=True, exclude_none=True, exclude=set(Endpoint.REPORTED))
        for e in endpoints
    ]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(ref, configmap_name(ref.name)),
        "data": {
            "cacheserver.env": env,
            "endpoints.json": json.dumps(listed, indent=2, sort_keys=True) + "\n",
            # memcached's usual server-list form: one host:port per line.
            "servers": "".join(f"{e.address}:{e.port}\n" for e in endpoints),
            MEMBERSHIP_KEY: membership_file(discovery),
        },
    }


def pod_disruption_budget(ref: ClusterRef) -> dict[str, Any]:
    """Voluntary evictions (drains) take one cache pod at a time."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(ref, pdb_name(ref.name)),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(ref.name)},
            # A pod that is not ready anyway must not block a node drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def desired_objects(
    ref: ClusterRef,
    spec: CacheClusterSpec,
    default_image: str,
    endpoints: Sequence[Endpoint] = (),
    discovery: DiscoveryStatus | None = None,
) -> list[dict[str, Any]]:
    """Everything a CacheCluster owns, in the order it is applied."""
    return [
        configmap(ref, spec, endpoints, discovery),
        headless_service(ref, spec),
        client_service(ref, spec),
        discovery_service(ref, spec),
        *statefulsets(ref, spec, default_image),
        pod_disruption_budget(ref),
    ]
