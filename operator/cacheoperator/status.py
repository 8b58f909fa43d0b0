"""Status from what is observed: pure functions over StatefulSet, pod and node dicts.

Endpoints come from the pods themselves (their `tcp-<i>`/`udp-<i>` container ports and
addresses), not from the spec, so they stay true during a rollout that changes ports and
while a spec is invalid.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cacheoperator.appliance import Restore
from cacheoperator.models import (
    DEFAULT_RACK_KEY,
    DEFAULT_ZONE_KEY,
    ApplianceStart,
    CacheClusterSpec,
    CacheClusterStatus,
    Condition,
    Endpoint,
)
from cacheoperator.naming import CONTAINER, LABEL_PARTITION, selector_string, statefulset_name
from cacheoperator.placement import partition_sizes

MAX_MESSAGE = 4096
# Waiting reasons after which a container will not start without someone changing something.
FAILING_REASONS = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)
# Conditions in their quiet state are not worth an event when first reported (a new
# cluster is not ready yet; that is news only once it was).
_QUIET = {("Degraded", "False"), ("Progressing", "False"), ("Ready", "False")}


@dataclass(frozen=True)
class Observed:
    """What the API server says exists for one cluster."""

    statefulsets: Sequence[Mapping[str, Any]] = ()
    pods: Sequence[Mapping[str, Any]] = ()
    node_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # What each ready pod's server said about its warm restart, by pod name.
    restores: Mapping[str, Restore] = field(default_factory=dict)


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


# ---- pods ------------------------------------------------------------------------------


def _conditions(obj: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}


def is_terminating(pod: Mapping[str, Any]) -> bool:
    return bool((pod.get("metadata") or {}).get("deletionTimestamp"))


def is_ready(pod: Mapping[str, Any]) -> bool:
    return _conditions(pod).get("Ready", {}).get("status") == "True" and not is_terminating(pod)


def unschedulable_message(pod: Mapping[str, Any]) -> str | None:
    """The scheduler's reason when it found no node for the pod, else None."""
    scheduled = _conditions(pod).get("PodScheduled", {})
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return scheduled.get("message") or "no node fits"
    return None


def failing_message(pod: Mapping[str, Any]) -> str | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILING_REASONS:
            detail = f": {waiting['message']}" if waiting.get("message") else ""
            return f"{waiting['reason']}{detail}"
    return None


def restarted_message(pod: Mapping[str, Any]) -> str | None:
    """Why a pod that ran is not ready now: its container exited and was restarted (a
    crash, a kill, a failed liveness probe) and has not passed its readiness probe yet.
    A pod that is not ready and never restarted is still starting: that is progress."""
    if is_ready(pod):
        return None
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        restarts = status.get("restartCount") or 0
        if restarts and not status.get("ready"):
            last = (status.get("lastState") or {}).get("terminated") or {}
            how = ", ".join(
                str(x)
                for x in (
                    f"exit code {last['exitCode']}" if "exitCode" in last else None,
                    last.get("reason"),
                )
                if x
            )
            detail = f" ({how})" if how else ""
            return f"container {status.get('name')} restarted{detail}, {restarts} restart(s) in all"
    return None


def started_at(pod: Mapping[str, Any], container: str = CONTAINER) -> str | None:
    """When the pod's server container last started (changes with every restart)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return ((status.get("state") or {}).get("running") or {}).get("startedAt")
    return None


def appliance_starts(
    pods: Sequence[Mapping[str, Any]], restores: Mapping[str, Restore]
) -> list[ApplianceStart]:
    """The warm-restart outcome of each ready pod, in endpoint order."""
    ready = sorted(
        (p for p in pods if is_ready(p)),
        key=lambda p: (_partition(p) or 0, _ordinal(_pod_name(p)), _pod_name(p)),
    )
    out = []
    for pod in ready:
        restore = restores.get(_pod_name(pod))
        if restore is None:
            continue
        out.append(
            ApplianceStart(
                pod=_pod_name(pod),
                node=(pod.get("spec") or {}).get("nodeName"),
                started_at=started_at(pod),
                warm_restart=restore.result,
                restored_items=restore.items if restore.result == "restored" else None,
                reason=restore.reason or None,
            )
        )
    return out


def _pod_name(pod: Mapping[str, Any]) -> str:
    return (pod.get("metadata") or {}).get("name", "")


def _ordinal(name: str) -> int:
    match = re.search(r"-(\d+)$", name)
    return int(match.group(1)) if match else -1


def _partition(pod: Mapping[str, Any]) -> int | None:
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_PARTITION)
    return int(value) if value and value.isdigit() else None


def pod_endpoints(
    pod: Mapping[str, Any],
    node_labels: Mapping[str, Mapping[str, str]],
    zone_key: str = DEFAULT_ZONE_KEY,
    rack_key: str = DEFAULT_RACK_KEY,
) -> list[Endpoint]:
    """One endpoint per worker of a pod, from its declared ports and its address."""
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    address = status.get("hostIP") if spec.get("hostNetwork") else status.get("podIP")
    if not address:
        return []
    ports: dict[str, int] = {}
    for container in spec.get("containers") or []:
        for port in container.get("ports") or []:
            if "name" in port:
                ports[port["name"]] = port["containerPort"]
    node = spec.get("nodeName")
    labels = node_labels.get(node, {}) if node else {}
    out = []
    worker = 0
    while f"tcp-{worker}" in ports:
        out.append(
            Endpoint(
                pod=_pod_name(pod),
                node=node,
                address=address,
                port=ports[f"tcp-{worker}"],
                udp_port=ports.get(f"udp-{worker}"),
                worker=worker,
                partition=_partition(pod),
                zone=labels.get(zone_key),
                rack=labels.get(rack_key),
            )
        )
        worker += 1
    return out


def endpoints(
    pods: Sequence[Mapping[str, Any]],
    node_labels: Mapping[str, Mapping[str, str]],
    zone_key: str = DEFAULT_ZONE_KEY,
    rack_key: str = DEFAULT_RACK_KEY,
) -> list[Endpoint]:
    """Endpoints of the ready pods, in a stable order (partition, pod ordinal, worker)."""
    ready = sorted(
        (p for p in pods if is_ready(p)),
        key=lambda p: (_partition(p) or 0, _ordinal(_pod_name(p)), _pod_name(p)),
    )
    return [e for p in ready for e in pod_endpoints(p, node_labels, zone_key, rack_key)]


# ---- StatefulSets ----------------------------------------------------------------------


def rollout_problems(
    spec: CacheClusterSpec,
    cluster: str,
    statefulsets: Sequence[Mapping[str, Any]],
    held: Mapping[str, str] | None = None,
) -> list[str]:
    """Why the StatefulSets have not converged yet; empty when they have. ``held``: those
    whose new template waits for another's rollout (rollout.held_statefulsets)."""
    by_name = {s["metadata"]["name"]: s for s in statefulsets}
    problems = []
    wanted = set()
    for partition, replicas in partition_sizes(spec):
        name = statefulset_name(cluster, partition)
        wanted.add(name)
        sts = by_name.get(name)
        if sts is None:
            problems.append(f"StatefulSet {name} not created yet")
            continue
        st = sts.get("status") or {}
        generation = sts["metadata"].get("generation", 0)
        if st.get("observedGeneration", 0) < generation:
            problems.append(f"StatefulSet {name} is waiting for its controller to see the change")
        elif (sts.get("spec") or {}).get("replicas") != replicas:
            problems.append(f"StatefulSet {name} is being resized to {replicas}")
        elif st.get("replicas", 0) != replicas:
            problems.append(f"StatefulSet {name} has {st.get('replicas', 0)}/{replicas} pods")
        elif st.get("updateRevision") and (
            st.get("currentRevision") != st.get("updateRevision")
            or st.get("updatedReplicas", 0) < replicas
        ):
            problems.append(
                f"StatefulSet {name} is rolling out: "
                f"{st.get('updatedReplicas', 0)}/{replicas} pods updated"
            )
    for name in sorted(set(by_name) - wanted):
        problems.append(f"StatefulSet {name} is being removed")
    for name, waits_for in sorted((held or {}).items()):
        problems.append(f"StatefulSet {name} waits for {waits_for} to finish rolling out")
    return problems


# ---- conditions ------------------------------------------------------------------------


def _placement_hint(spec: CacheClusterSpec) -> str:
    p = spec.placement
    if p.strategy == "spread":
        level = p.effective_spread_level
        zones = math.ceil(spec.replicas / p.effective_max_per_zone) if spec.replicas else 0
        return (
            f"strategy spread puts at most one pod per {level} and at most "
            f"{p.effective_max_per_zone} per zone: {spec.replicas} pods need "
            f"{spec.replicas} {level}s in at least {zones} zone(s) "
            f"(nodes labelled {p.zone_key}"
            + (f" and {p.rack_key}" if level == "rack" else "")
            + ")"
        )
    if p.strategy == "cluster":
        return (
            f"strategy cluster needs room for all {spec.replicas} pods in one zone "
            f"(nodes labelled {p.zone_key})"
        )
    return (
        f"strategy partition needs a rack of its own for each of the "
        f"{p.partition_count} partitions (nodes labelled {p.rack_key})"
    )


def _truncate(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def _condition(
    kind: str,
    status: bool,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Mapping[str, Any]],
    now: str,
) -> Condition:
    value = "True" if status else "False"
    old = previous.get(kind)
    # The time moves only when the status flips, as Kubernetes conditions do.
    since = old["lastTransitionTime"] if old and old.get("status") == value else now
    return Condition(
        type=kind,
        status=value,
        reason=reason,
        message=_truncate(message),
        last_transition_time=since,
        observed_generation=generation,
    )


def _previous_conditions(previous: Mapping[str, Any] | None) -> dict[str, Mapping[str, Any]]:
    return {c["type"]: c for c in (previous or {}).get("conditions") or [] if "type" in c}


def _live(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [p for p in pods if not is_terminating(p)]


def compute_status(
    *,
    cluster: str,
    generation: int,
    spec: CacheClusterSpec,
    observed: Observed,
    previous: Mapping[str, Any] | None,
    now: str,
    apply_error: str | None = None,
    held: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The status of a valid cluster, as a dict ready for the status subresource.

    `apply_error` is the API server's refusal of a child object, if there was one; `held`
    the StatefulSets whose new template waits for another's rollout.
    """
    pods = _live(observed.pods)
    ready = sum(1 for p in pods if is_ready(p))
    desired = spec.replicas
    rollout = rollout_problems(spec, cluster, observed.statefulsets, held)
    stuck = [(n, m) for p in pods if (m := unschedulable_message(p)) for n in [_pod_name(p)]]
    failing = [(n, m) for p in pods if (m := failing_message(p)) for n in [_pod_name(p)]]
    restarted = [(n, m) for p in pods if (m := restarted_message(p)) for n in [_pod_name(p)]]
    prev = _previous_conditions(previous)

    if apply_error:
        degraded = (True, "ApplyFailed", f"the API server refused a child object: {apply_error}")
    elif stuck:
        names = ", ".join(sorted(n for n, _ in stuck))
        degraded = (
            True,
            "Unschedulable",
            f"{len(stuck)} pod(s) cannot be scheduled ({names}): {stuck[0][1]} "
            f"Hint: {_placement_hint(spec)}.",
        )
    elif failing:
        names = ", ".join(sorted(n for n, _ in failing))
        degraded = (
            True,
            "PodsFailing",
            f"{len(failing)} pod(s) failing ({names}): {failing[0][1]}",
        )
    elif restarted:
        names = ", ".join(sorted(n for n, _ in restarted))
        degraded = (
            True,
            "PodsRestarted",
            f"{len(restarted)} pod(s) restarted and not ready ({names}): {restarted[0][1]}",
        )
    else:
        degraded = (False, "AsExpected", "all pods schedulable and running")

    if rollout:
        progressing = (True, "RollingOut", "; ".join(rollout))
    elif ready < desired and not degraded[0]:
        progressing = (True, "WaitingForPods", f"{ready}/{desired} pods ready")
    else:
        progressing = (False, "Complete", f"{len(pods)} pods on the current spec")

    all_ready = ready >= desired and len(pods) == desired
    if all_ready:
        ready_c = (True, "AllPodsReady", f"{ready}/{desired} pods ready")
    else:
        ready_c = (False, "PodsNotReady", f"{ready}/{desired} pods ready")

    if degraded[0]:
        phase = "Degraded"
    elif all_ready:
        phase = "Ready"
    elif ready == 0:
        phase = "Pending"
    else:
        phase = "Progressing"

    placement = spec.placement
    status = CacheClusterStatus(
        phase=phase,
        replicas=len(pods),
        ready_replicas=ready,
        observed_generation=generation,
        selector=selector_string(cluster),
        conditions=[
            _condition("Ready", *ready_c, generation, prev, now),
            _condition("Progressing", *progressing, generation, prev, now),
            _condition("Degraded", *degraded, generation, prev, now),
        ],
        endpoints=endpoints(pods, observed.node_labels, placement.zone_key, placement.rack_key),
        appliances=appliance_starts(pods, observed.restores),
    )
    return status.model_dump(by_alias=True, exclude_none=True)


def invalid_status(
    *,
    cluster: str,
    generation: int,
    problems: Sequence[str],
    observed: Observed,
    previous: Mapping[str, Any] | None,
    now: str,
) -> dict[str, Any]:
    """The status of a cluster whose spec cannot be run: the running pods are left alone."""
    pods = _live(observed.pods)
    ready = sum(1 for p in pods if is_ready(p))
    prev = _previous_conditions(previous)
    message = "invalid spec, the running pods are left as they are: " + "; ".join(problems)
    status = CacheClusterStatus(
        phase="Invalid",
        replicas=len(pods),
        ready_replicas=ready,
        observed_generation=generation,
        selector=selector_string(cluster),
        conditions=[
            _condition("Ready", False, "InvalidSpec", message, generation, prev, now),
            _condition(
                "Progressing",
                False,
                "InvalidSpec",
                "waiting for a valid spec",
                generation,
                prev,
                now,
            ),
            _condition("Degraded", True, "InvalidSpec", message, generation, prev, now),
        ],
        endpoints=endpoints(pods, observed.node_labels),
    )
    return status.model_dump(by_alias=True, exclude_none=True)


def restore_events(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[Event]:
    """One event per appliance start that the status reports for the first time."""
    seen = {
        (a.get("pod"), a.get("startedAt"), a.get("warmRestart"))
        for a in (previous or {}).get("appliances") or []
    }
    events = []
    for a in current.get("appliances") or []:
        pod, result = a["pod"], a["warmRestart"]
        if (pod, a.get("startedAt"), result) in seen or result == "unknown":
            continue
        if result == "restored":
            message = f"{pod} restored {a.get('restoredItems', 0)} items from its snapshot"
            events.append(Event("Normal", "Restored", message))
        elif result == "refused":
            message = f"{pod} refused its snapshot ({a.get('reason', '?')}) and started empty"
            events.append(Event("Warning", "SnapshotRefused", message))
        else:
            message = (
                f"{pod} started empty on {a.get('node') or 'its node'}: no snapshot there (a "
                "first start, another node, or a stop that was not graceful)"
            )
            events.append(Event("Normal", "StartedEmpty", message))
    return events


def transitions(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[Event]:
    """Events worth posting: conditions whose status or reason changed. Two conditions
    that changed for the same reason with the same message make one event."""
    prev = _previous_conditions(previous)
    events: dict[tuple[str, str], str] = {}  # (reason, message) -> type
    for cond in current.get("conditions") or []:
        kind, value, reason = cond["type"], cond["status"], cond["reason"]
        old = prev.get(kind)
        if old is None and (kind, value) in _QUIET:
            continue
        if old is not None and (old.get("status"), old.get("reason")) == (value, reason):
            continue
        bad = (kind == "Degraded" and value == "True") or (
            kind == "Ready" and value == "False" and old is not None and old["status"] == "True"
        )
        key = (reason, cond["message"])
        if bad or key not in events:
            events[key] = "Warning" if bad else events.get(key, "Normal")
    return [Event(type=t, reason=r, message=m) for (r, m), t in events.items()]
