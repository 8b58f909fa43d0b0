"""Auto discovery: the membership every appliance serves to `config get cluster`, as pure
functions over the spec, the pods and the membership published before.

Who is a member: one node per worker of every pod the spec asks for (partition by
partition, ordinal by ordinal), from the moment the pod has an address. A pod that is
restarted, or deleted and re-created by its StatefulSet, keeps its place: while it has no
address the node published before for it stays. So the list changes (and its version goes
up by one) when the spec adds or removes pods, when a pod comes up for the first time, and
when one comes back on another node or port; never because a pod is not ready for a
moment. Readiness is what `status.endpoints` is for.

The version is kept in the CacheCluster's status (the operator's memory across restarts)
and published with the list in the ConfigMap `<name>-config`, key `cluster.json`, which
every pod mounts; the server (cacheserver.discovery) polls that file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from cacheoperator.models import CacheClusterSpec, DiscoveryNode, DiscoveryStatus
from cacheoperator.naming import ClusterRef, discovery_service_name, pod_host
from cacheoperator.placement import pod_names
from cacheoperator.status import pod_endpoints

# The ConfigMap key, and where the pods find it (pods.py mounts it, the server polls it).
MEMBERSHIP_KEY = "cluster.json"
MOUNT_DIR = "/etc/cacheserver/discovery"
MEMBERSHIP_PATH = f"{MOUNT_DIR}/{MEMBERSHIP_KEY}"


def discovery_endpoint(ref: ClusterRef, spec: CacheClusterSpec) -> str:
    """The one address a client is configured with: the discovery Service, worker 0's port."""
    return f"{discovery_service_name(ref.name)}.{ref.namespace}.svc:{spec.port}"


def members(
    ref: ClusterRef,
    spec: CacheClusterSpec,
    pods: Sequence[Mapping[str, Any]],
    previous: Sequence[DiscoveryNode] = (),
) -> list[DiscoveryNode]:
    """The membership now: every worker of every wanted pod that has (or had) an address."""
    by_name = {(p.get("metadata") or {}).get("name"): p for p in pods}
    before: dict[str, list[DiscoveryNode]] = {}
    for node in previous:
        before.setdefault(node.pod, []).append(node)
    out: list[DiscoveryNode] = []
    for name in pod_names(ref.name, spec):  # the membership's order
        pod = by_name.get(name)
        found = pod_endpoints(pod, {}) if pod is not None else []
        if not found:
            # Gone for a moment (deleted and not re-created yet, or not placed yet): it
            # keeps its place, so clients do not rehash for a restart.
            out += before.get(name, [])
            continue
        host = pod_host(name, ref.name, ref.namespace)
        out += [
            DiscoveryNode(pod=name, worker=e.worker, host=host, address=e.address, port=e.port)
            for e in found
        ]
    return out


def _listed(nodes: Sequence[DiscoveryNode]) -> list[tuple[str, str, int]]:
    return [(n.host, n.address, n.port) for n in nodes]


def next_discovery(
    previous: DiscoveryStatus | None,
    nodes: Sequence[DiscoveryNode],
    endpoint: str,
    now: str,
) -> DiscoveryStatus:
    """The version goes up by one when the list clients see (host|ip|port, in order)
    changed, and never otherwise; a first, empty list is version 0."""
    before = previous.nodes if previous is not None else []
    if previous is not None and _listed(before) == _listed(nodes):
        version, changed = previous.version, previous.last_change_time
    elif previous is None and not nodes:
        version, changed = 0, now
    else:
        version, changed = (previous.version if previous else 0) + 1, now
    return DiscoveryStatus(
        endpoint=endpoint, version=version, last_change_time=changed, nodes=list(nodes)
    )


def previous_discovery(status: Mapping[str, Any] | None) -> DiscoveryStatus | None:
    """The membership published before, from the CacheCluster's status (None if none, or if
    it does not read as one)."""
    raw = (status or {}).get("discovery")
    if not raw:
        return None
    try:
        return DiscoveryStatus.model_validate(raw)
    except ValidationError:
        return None


def membership_file(discovery: DiscoveryStatus | None) -> str:
    """The ConfigMap key the servers poll (cacheserver.discovery.membership reads it)."""
    doc: dict[str, Any] = {"version": 0}
    if discovery is not None:
        doc["version"] = discovery.version
        if discovery.last_change_time:
            doc["changed"] = discovery.last_change_time
    nodes = discovery.nodes if discovery is not None else []
    doc["nodes"] = [{"host": n.host, "ip": n.address, "port": n.port} for n in nodes]
    return json.dumps(doc, indent=2) + "\n"
