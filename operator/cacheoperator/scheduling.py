"""Why pods cannot be scheduled, from the scheduler's own words and the pods around them.

Pure functions over pod dicts. The scheduler writes one line per failed attempt on the pod
(condition PodScheduled=False, reason Unschedulable), e.g.

    0/3 nodes are available: 1 node(s) didn't match pod anti-affinity rules, 2 node(s)
    didn't have free ports for the requested pod ports. preemption: 0/3 nodes are
    available: 3 No preemption victims found for incoming pod.

`scheduler_reasons` splits that into (node count, reason); kube-scheduler 1.36 writes
"... pod ports. no new claims to deallocate, preemption: ..." after the list. When a
reason is a host port, `port_holders` finds who holds it: the pods that declare the same
host port and protocol on a node the stuck pod could otherwise use (its nodeSelector and
required node affinity). A pod with the same port on a node the stuck pod may not use is
no conflict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cacheoperator.naming import LABEL_CLUSTER

PORTS_TAKEN = "didn't have free ports"


@dataclass(frozen=True, order=True)
class HostPort:
    port: int
    protocol: str = "TCP"

    def __str__(self) -> str:
        return f"{self.port}/{self.protocol}"


@dataclass(frozen=True, order=True)
class PortHolder:
    """`pod` (namespace/name) holds `port` on `node`; `holder` names it for people."""

    holder: str
    port: HostPort
    node: str
    pod: str
    own: bool  # a pod of the stuck pod's own CacheCluster


def _meta(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("metadata") or {}


def _spec(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    return pod.get("spec") or {}


def host_ports(pod: Mapping[str, Any]) -> frozenset[HostPort]:
    """The host ports a pod declares (what the scheduler's NodePorts check compares).
    With hostNetwork the API server fills hostPort in from containerPort."""
    spec = _spec(pod)
    found = set()
    for container in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for port in container.get("ports") or []:
            number = port.get("hostPort") or (
                port.get("containerPort") if spec.get("hostNetwork") else None
            )
            if number:
                found.add(HostPort(int(number), port.get("protocol") or "TCP"))
    return frozenset(found)


def scheduler_reasons(message: str) -> list[tuple[int, str]]:
    """(nodes, reason) for each reason of a scheduler message, most nodes first; the
    preemption part is left out (it repeats the count and says what preemption did)."""
    _, sep, listed = message.partition("nodes are available:")
    if not sep:
        return []
    # The list ends with the first sentence: what follows is about preemption (and, from
    # 1.34 on, "no new claims to deallocate, preemption: ..."). Taint keys hold dots, but
    # never a dot before a space.
    listed = re.split(r"\.(?:\s|$)", listed, maxsplit=1)[0]
    out = []
    # Reasons are ", "-separated and each starts with a count; a taint's braces may hold
    # commas, so split only where a count follows.
    for item in re.split(r",\s+(?=\d+\s)", listed.strip()):
        match = re.match(r"(\d+)\s+(.*?)\.?$", item.strip())
        if match:
            out.append((int(match.group(1)), match.group(2)))
    return sorted(out, key=lambda r: -r[0])


def says_ports_taken(message: str) -> bool:
    return PORTS_TAKEN in message


def _expression_holds(expr: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    key, op = expr.get("key"), expr.get("operator")
    values = list(expr.get("values") or [])
    if op == "Exists":
        return key in labels
    if op == "DoesNotExist":
        return key not in labels
    if op == "In":
        return key in labels and labels[key] in values
    if op == "NotIn":
        return key not in labels or labels[key] not in values
    if op in ("Gt", "Lt") and key in labels and values:
        try:
            have, bound = int(labels[key]), int(values[0])
        except ValueError:
            return False
        return have > bound if op == "Gt" else have < bound
    return False


def node_fits(pod: Mapping[str, Any], labels: Mapping[str, str] | None) -> bool:
    """Whether the pod's nodeSelector and required node affinity allow a node with these
    labels. Unknown labels (None) count as a fit: the node cannot be ruled out."""
    if labels is None:
        return True
    spec = _spec(pod)
    if any(labels.get(k) != v for k, v in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    if not terms:
        return True
    # Terms are ORed; the expressions of one term are ANDed (matchFields: not ruled out).
    return any(
        all(_expression_holds(e, labels) for e in term.get("matchExpressions") or [])
        for term in terms
    )


def holder_name(pod: Mapping[str, Any]) -> str:
    """ "CacheCluster ns/name" for an appliance, else "pod ns/name"."""
    meta = _meta(pod)
    namespace = meta.get("namespace", "")
    cluster = (meta.get("labels") or {}).get(LABEL_CLUSTER)
    if cluster:
        return f"CacheCluster {namespace}/{cluster}"
    return f"pod {namespace}/{meta.get('name', '')}"


def _is_own(pod: Mapping[str, Any], namespace: str, cluster: str) -> bool:
    meta = _meta(pod)
    return (
        meta.get("namespace") == namespace
        and (meta.get("labels") or {}).get(LABEL_CLUSTER) == cluster
    )


def _holds_a_node(pod: Mapping[str, Any]) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return bool(_spec(pod).get("nodeName")) and phase not in ("Succeeded", "Failed")


def port_holders(
    stuck: Mapping[str, Any],
    pods: Iterable[Mapping[str, Any]],
    node_labels: Mapping[str, Mapping[str, str]],
    cluster: str,
) -> list[PortHolder]:
    """Who holds a host port of `stuck` on a node `stuck` could otherwise use."""
    wanted = host_ports(stuck)
    namespace = _meta(stuck).get("namespace", "")
    found = set()
    for pod in pods:
        if not _holds_a_node(pod):
            continue
        node = _spec(pod)["nodeName"]
        taken = wanted & host_ports(pod)
        if not taken or not node_fits(stuck, node_labels.get(node)):
            continue
        meta = _meta(pod)
        for port in taken:
            found.add(
                PortHolder(
                    holder=holder_name(pod),
                    port=port,
                    node=node,
                    pod=f"{meta.get('namespace', '')}/{meta.get('name', '')}",
                    own=_is_own(pod, namespace, cluster),
                )
            )
    return sorted(found)


def describe_holders(holders: Sequence[PortHolder]) -> str:
    """ "11211/TCP and 21211/TCP held by CacheCluster ns/a on node-1, node-2; ..."."""
    by_holder: dict[str, tuple[set[HostPort], set[str]]] = {}
    for h in holders:
        ports, nodes = by_holder.setdefault(h.holder, (set(), set()))
        ports.add(h.port)
        nodes.add(h.node)
    parts = []
    for holder, (ports, nodes) in sorted(by_holder.items()):
        listed = " and ".join(str(p) for p in sorted(ports))
        parts.append(f"{listed} held by {holder} on {', '.join(sorted(nodes))}")
    return "; ".join(parts)
