"""Back to its node: a replaced appliance starts where its warm-restart snapshot is.

The snapshot an appliance saves on SIGTERM lies on its node (pods.py), and a StatefulSet
re-creates a deleted pod under the same name (a rollout, an eviction, `kubectl delete`).
Left alone, the scheduler puts the new pod on any node that fits: host ports and
anti-affinity keep it off its siblings' nodes, but a spare node scores as well as its own,
and there it starts empty. So with warm restart the pod template carries a scheduling gate
(`GATE`), which holds a new pod back from the scheduler, and the operator releases it at
once from the pod's event: after one read of the CacheCluster, one patch removes the gate
and adds a preferred node-affinity term for the node where the pod of that name last ran
ready (`status.lastNodes`, which the operator keeps, so it outlives pods and operator
restarts). A pod with no such node is just released. A release that cannot add the term
(the cluster unreadable, the term refused) releases the pod without it: the gate never
keeps a pod Pending for an error the operator can get round.

The same patch tells the pod where the latest snapshot of its appliance is: the annotation
`SNAPSHOT_NODE` holds the node of `status.lastNodes` (or `NO_NODE` when the status knows
none), and the init container, which reads it through the downward API, removes a snapshot
on any other node (cacheserver.warmdir): after a move (node-2, node-4, node-2 again) the
snapshot left on node-2 is older than the writes the appliance took on node-4. A pod
released without a read of the CacheCluster gets no annotation, and keeps its snapshot.

Why preferred and not required: while a pod is gated the API server (1.30 and later)
accepts any change to its preferred node-affinity terms, but a required term only
narrows, and a pod required onto a node that is gone, cordoned or full would stay Pending,
its cache lost anyway. The preference (weight 100, so its node gets the NodeAffinity
plugin's whole score) brings the pod back whenever its node can take it, and lets it start
elsewhere when not: then `status.lastNodes` and `status.appliances` name the node it
left (`previousNode`) and an event says it started without its snapshot.

Pure functions; the API calls are in reconcile.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from cacheoperator.models import LastNode

GATE = "cache.appliance.io/placement"
# Where the appliance last ran ready, for its init container (the same word as
# cacheserver.warmdir's NO_NODE when nowhere).
SNAPSHOT_NODE = "cache.appliance.io/snapshot-node"
NO_NODE = "-"
WEIGHT = 100  # the most a preferred scheduling term may weigh
NODE_NAME = "metadata.name"  # the node field a node selector term may match


def scheduling_gates() -> list[dict[str, str]]:
    """The pod template's gates (with warm restart)."""
    return [{"name": GATE}]


def _gates(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((pod.get("spec") or {}).get("schedulingGates") or [])


def is_gated(pod: Mapping[str, Any]) -> bool:
    """Whether the pod waits for the operator (our gate; other gates are not ours)."""
    return not (pod.get("metadata") or {}).get("deletionTimestamp") and any(
        g.get("name") == GATE for g in _gates(pod)
    )


def node_term(node: str) -> dict[str, Any]:
    """The preferred node-affinity term for exactly this node (by name, not by a label that
    may differ from it)."""
    return {
        "weight": WEIGHT,
        "preference": {"matchFields": [{"key": NODE_NAME, "operator": "In", "values": [node]}]},
    }


def release_patch(
    pod: Mapping[str, Any], node: str | None, snapshot_node: str | None = None
) -> dict[str, Any]:
    """A strategic merge patch that removes our gate and, given `node`, adds a preference
    for it; given `snapshot_node` (a node, or NO_NODE), it annotates the pod with where
    its appliance last ran. Gates merge by name, so the patch deletes ours alone, whatever
    other gates the pod has by then; the preferred terms are an atomic list, replaced
    whole: the pod's own terms and ours. No resourceVersion: the scheduler writes the pod's
    status (reason SchedulingGated) as the pod arrives, which must not make the release
    fail. Sent twice (by the pod's event and by a pass), it changes nothing the second
    time."""
    spec: dict[str, Any] = {"schedulingGates": [{"$patch": "delete", "name": GATE}]}
    patch: dict[str, Any] = {"spec": spec}
    if snapshot_node is not None:
        patch["metadata"] = {"annotations": {SNAPSHOT_NODE: snapshot_node}}
    if node:
        node_affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
        preferred = list(node_affinity.get("preferredDuringSchedulingIgnoredDuringExecution") or [])
        if node_term(node) not in preferred:
            preferred.append(node_term(node))
        spec["affinity"] = {
            "nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": preferred}
        }
    return patch


def recorded_nodes(status: Mapping[str, Any] | None) -> list[LastNode]:
    """`status.lastNodes` as written before (entries that do not read as one are dropped)."""
    out = []
    for raw in (status or {}).get("lastNodes") or []:
        try:
            out.append(LastNode.model_validate(raw))
        except ValidationError:
            continue
    return out


def home_node(status: Mapping[str, Any] | None, pod: str) -> str | None:
    """The node where the pod of this name last ran ready, if the status knows one."""
    return next((e.node for e in recorded_nodes(status) if e.pod == pod), None)


def last_nodes(
    previous: Sequence[LastNode],
    ready_pods: Iterable[Mapping[str, Any]],
    wanted: Sequence[str],
) -> list[LastNode]:
    """Where each pod of `wanted` (in that order) last ran ready. A ready pod on a node
    records that node; a new pod (another uid) on another node than the one recorded
    records that it moved (`previous_node`); a pod that is away (replaced, not ready, not
    placed) keeps its entry. Names the spec no longer asks for are dropped."""
    before = {e.pod: e for e in previous}
    now: dict[str, LastNode] = {}
    for pod in ready_pods:
        meta, node = pod.get("metadata") or {}, (pod.get("spec") or {}).get("nodeName")
        name, uid = meta.get("name"), meta.get("uid")
        if not name or not node:
            continue
        old = before.get(name)
        if old is not None and old.uid == uid and old.node == node:
            now[name] = old
            continue
        moved = old.node if old is not None and old.node != node else None
        now[name] = LastNode(pod=name, node=node, uid=uid, previous_node=moved)
    return [e for name in wanted if (e := now.get(name) or before.get(name)) is not None]


def moved_from(entries: Sequence[LastNode], pod: Mapping[str, Any]) -> str | None:
    """The node this very pod's predecessor ran on, if it was another: this pod started
    without its snapshot."""
    meta = pod.get("metadata") or {}
    for entry in entries:
        if entry.pod == meta.get("name") and entry.uid == meta.get("uid"):
            return entry.previous_node
    return None
