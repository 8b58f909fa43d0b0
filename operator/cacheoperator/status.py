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

from cacheoperator.appliances import ApplianceReport, Reading, Restore, pod_restores
from cacheoperator.gate import last_nodes, moved_from, recorded_nodes
from cacheoperator.models import (
    DEFAULT_RACK_KEY,
    DEFAULT_ZONE_KEY,
    ApplianceStart,
    CacheClusterSpec,
    CacheClusterStatus,
    Condition,
    DiscoveryStatus,
    Endpoint,
    LastNode,
    RolloutStatus,
)
from cacheoperator.naming import (
    AUTH_MOUNT,
    CONTAINER,
    LABEL_PARTITION,
    TLS_MOUNT,
    selector_string,
    statefulset_name,
)
from cacheoperator.pinning import NOT_EXCLUSIVE, PINNING_OFF, pinned_condition
from cacheoperator.placement import partition_sizes, pod_names
from cacheoperator.quantity import format_bytes
from cacheoperator.scheduling import (
    PORTS_TAKEN,
    PortHolder,
    describe_holders,
    port_holders,
    says_ports_taken,
    scheduler_reasons,
)
from cacheserver.cpus import format_cpu_list

MAX_MESSAGE = 4096
# A termination message that is the log's tail (FallbackToLogsOnError) can be 80 lines:
# the last few say why.
TERMINATION_LINES = 3
TERMINATION_CHARS = 1024
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
# cluster is not ready yet; that is news only once it was; its appliances have not
# reported their CPUs yet; it asked for no pinning).
_QUIET = {
    ("Degraded", "False"),
    ("Progressing", "False"),
    ("Ready", "False"),
    ("Pinned", "Unknown"),
}
_QUIET_REASONS = {PINNING_OFF}


@dataclass(frozen=True)
class Observed:
    """What the API server says exists for one cluster.

    `host_port_pods` are the pods on any node that declare host ports, read only when a
    pod of the cluster is unschedulable for a port (`needs_host_port_pods`), with the labels
    of their nodes in `node_labels`; `host_port_note` says what the operator could not see.
    `readings` are what the appliances of the ready pods said about their CPUs, memory
    and warm restart (appliances.py).
    """

    statefulsets: Sequence[Mapping[str, Any]] = ()
    pods: Sequence[Mapping[str, Any]] = ()
    node_labels: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    host_port_pods: Sequence[Mapping[str, Any]] = ()
    host_port_note: str = ""
    # What the appliances reported, by (pod, worker); see appliances.py.
    readings: Mapping[tuple[str, int], Reading] = field(default_factory=dict)


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


def needs_host_port_pods(pods: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a pod waits for a host port: then the pods that hold ports are worth a read."""
    return any(says_ports_taken(m) for p in _live(pods) if (m := unschedulable_message(p)))


def _last_termination(container: Mapping[str, Any]) -> Mapping[str, Any]:
    """How the container's last run ended: its current state if it is terminated now,
    else its last state (a restarted container)."""
    state = (container.get("state") or {}).get("terminated")
    return state or (container.get("lastState") or {}).get("terminated") or {}


def termination_reason(container: Mapping[str, Any]) -> str | None:
    """The container's own account of its last stop: the termination message the server
    wrote (or, with FallbackToLogsOnError, the tail of its log), on one line."""
    message = (_last_termination(container).get("message") or "").strip()
    if not message:
        return None
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    text = " / ".join(lines[-TERMINATION_LINES:])
    return text if len(text) <= TERMINATION_CHARS else "..." + text[-TERMINATION_CHARS:]


def _how_it_ended(container: Mapping[str, Any]) -> str:
    last = _last_termination(container)
    return ", ".join(
        str(x)
        for x in (
            f"exit code {last['exitCode']}" if "exitCode" in last else None,
            last.get("reason"),
        )
        if x
    )


def failing_message(pod: Mapping[str, Any]) -> str | None:
    """Why a container will not start, with the server's own reason when it gave one:
    "CrashLoopBackOff (exit code 2, Error): cannot size memory: ..."."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in FAILING_REASONS:
            how = _how_it_ended(status)
            said = termination_reason(status)
            detail = said or waiting.get("message")
            return (
                f"{waiting['reason']}{f' ({how})' if how else ''}{f': {detail}' if detail else ''}"
            )
    return None


def secret_problem(spec: CacheClusterSpec, message: str) -> str | None:
    """Which Secret a failing server could not use, from its own termination message (the
    operator never reads Secrets: the server does, and says what it found wanting)."""
    if spec.auth is not None and AUTH_MOUNT in message:
        return (
            f"the Secret {spec.auth.secret_name!r} (spec.auth.secretName) is missing, has no "
            f"key {spec.auth.key!r}, or that key is not user:password lines: {message}"
        )
    if spec.tls is not None and TLS_MOUNT in message:
        wanted = "tls.crt, tls.key" + (", ca.crt" if spec.tls.verify_mode else "")
        return (
            f"the Secret {spec.tls.secret_name!r} (spec.tls.secretName) is missing, or its "
            f"{wanted} are missing or do not load: {message}"
        )
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
            how = _how_it_ended(status)
            said = termination_reason(status)
            return (
                f"container {status.get('name')} restarted{f' ({how})' if how else ''}, "
                f"{restarts} restart(s) in all{f': {said}' if said else ''}"
            )
    return None


def started_at(pod: Mapping[str, Any], container: str = CONTAINER) -> str | None:
    """When the pod's server container last started (changes with every restart)."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == container:
            return ((status.get("state") or {}).get("running") or {}).get("startedAt")
    return None


def appliance_starts(
    pods: Sequence[Mapping[str, Any]],
    restores: Mapping[str, Restore],
    nodes: Sequence[LastNode] = (),
) -> list[ApplianceStart]:
    """The warm-restart outcome of each ready pod, in endpoint order, with the node its
    predecessor ran on when that was another (`nodes`: status.lastNodes)."""
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
                previous_node=moved_from(nodes, pod),
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
    readings: Mapping[tuple[str, int], Reading] | None = None,
) -> list[Endpoint]:
    """Endpoints of the ready pods, in a stable order (partition, pod ordinal, worker), with
    what each worker reported about its CPUs and memory limit, once it has."""
    ready = sorted(
        (p for p in pods if is_ready(p)),
        key=lambda p: (_partition(p) or 0, _ordinal(_pod_name(p)), _pod_name(p)),
    )
    out = [e for p in ready for e in pod_endpoints(p, node_labels, zone_key, rack_key)]
    return [_with_report(e, (readings or {}).get((e.pod, e.worker))) for e in out]


def _with_report(endpoint: Endpoint, reading: Reading) -> Endpoint:
    if not isinstance(reading, ApplianceReport):
        return endpoint
    limit = reading.memory_limit
    return endpoint.model_copy(
        update={
            "cpus": format_cpu_list(reading.cpus),
            "memory_limit": format_bytes(limit) if limit is not None else None,
            "memory_limit_source": reading.memory_limit_source,
        }
    )


# ---- StatefulSets ----------------------------------------------------------------------


def rollout_problems(
    spec: CacheClusterSpec,
    cluster: str,
    statefulsets: Sequence[Mapping[str, Any]],
    held: Mapping[str, str] | None = None,
    rollout: RolloutStatus | None = None,
) -> list[str]:
    """Why the StatefulSets have not converged yet; empty when they have. ``held``: those
    whose new template waits for another's rollout (rollout.plan_rollout), ``rollout``
    where the rollout is (what it waits for, what it passed over)."""
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
    if rollout is not None and rollout.waiting_for == "restores" and held:
        problems.append(
            f"the new appliances of StatefulSet {rollout.statefulset} have not reported what "
            "they restored yet"
        )
    for name, waits_for in sorted((held or {}).items()):
        problems.append(f"StatefulSet {name} waits for {waits_for} to finish rolling out")
    for name in rollout.timed_out if rollout is not None else ():
        problems.append(
            f"StatefulSet {name} made no progress for {rollout.deadline_seconds or '?'} s: "
            "the rollout went on without it"
        )
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


def _labels_hint(spec: CacheClusterSpec, nodes: int) -> str:
    p = spec.placement
    keys = {
        "cluster": [p.zone_key],
        "spread": [p.zone_key] + ([p.rack_key] if p.effective_spread_level == "rack" else []),
        "partition": [p.rack_key],
    }[p.strategy]
    needs = [f"{k}={v} (spec.nodeSelector)" for k, v in sorted(spec.node_selector.items())]
    needs += [f"a {k} label (strategy {p.strategy})" for k in keys if k not in spec.node_selector]
    return f"{nodes} node(s) lack what the pods require of a node: {' and '.join(needs)}"


def _ports_hint(
    spec: CacheClusterSpec, holders: Sequence[PortHolder], note: str, nodes: int
) -> str:
    own = [h for h in holders if h.own]
    if own:
        ports = " and ".join(str(p) for p in sorted({h.port for h in own}))
        held = len({h.node for h in own})
        return (
            f"one appliance per node per port: the cluster's own pods hold {ports} on "
            f"{held} node(s), and {_placement_hint(spec)}"
        )
    return (
        f"another pod declares a host port of these pods on {nodes} node(s) and the operator "
        f"could not see which{f' ({note})' if note else ''}; "
        "try another spec.port, or spec.nodeSelector for other nodes"
    )


def _unschedulable_hint(
    spec: CacheClusterSpec, message: str, holders: Sequence[PortHolder], note: str
) -> str:
    """What to change, for each reason the scheduler gave, most nodes first: the
    placement strategy is blamed only for the reasons that are the strategy's."""
    hints: list[str] = []
    for nodes, reason in scheduler_reasons(message):
        text = reason.lower()
        if PORTS_TAKEN in text:
            hint = _ports_hint(spec, holders, note, nodes)
        elif "insufficient" in text:
            hint = (
                f"each pod requests {spec.resources.cpu} CPU and {spec.resources.memory} of "
                f"memory (requests = limits): {nodes} node(s) lack that much unreserved "
                "(spec.resources)"
            )
        elif "taint" in text:
            hint = f"{nodes} node(s) have taints the pods do not tolerate (spec.tolerations)"
        elif "node affinity/selector" in text:
            hint = _labels_hint(spec, nodes)
        elif "unschedulable" in text:
            hint = f"{nodes} node(s) are cordoned"
        else:
            hint = _placement_hint(spec)
        if hint not in hints:
            hints.append(hint)
    return "; ".join(hints) or _placement_hint(spec)


def _unschedulable(
    spec: CacheClusterSpec,
    cluster: str,
    stuck: Sequence[tuple[Mapping[str, Any], str]],
    observed: Observed,
) -> tuple[bool, str, str]:
    names = ", ".join(sorted(_pod_name(p) for p, _ in stuck))
    head = f"{len(stuck)} pod(s) cannot be scheduled ({names})"
    message = stuck[0][1]
    holders: list[PortHolder] = []
    for pod, said in stuck:
        if says_ports_taken(said):
            holders += port_holders(pod, observed.host_port_pods, observed.node_labels, cluster)
    others = sorted({h for h in holders if not h.own})
    if others:
        return (
            True,
            "PortConflict",
            f"{head}: host ports taken on the nodes they may use: {describe_holders(others)}. "
            f"Scheduler: {message} Hint: give this CacheCluster another spec.port (its UDP "
            "and metrics ports follow unless set), or other nodes (spec.nodeSelector).",
        )
    hint = _unschedulable_hint(spec, message, holders, observed.host_port_note)
    return (True, "Unschedulable", f"{head}: {message} Hint: {hint}.")


def _truncate(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 3] + "..."


def _condition(
    kind: str,
    status: bool | str,
    reason: str,
    message: str,
    generation: int,
    previous: Mapping[str, Mapping[str, Any]],
    now: str,
) -> Condition:
    value = status if isinstance(status, str) else "True" if status else "False"
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
    discovery: DiscoveryStatus | None = None,
    held: Mapping[str, str] | None = None,
    rollout: RolloutStatus | None = None,
) -> dict[str, Any]:
    """The status of a valid cluster, as a dict ready for the status subresource.

    `apply_error` is the API server's refusal of a child object, if there was one;
    `discovery` the membership published for auto discovery (discovery.py); `held` the
    StatefulSets whose new template waits for another's rollout, `rollout` where the
    rollout is (rollout.Plan.status).
    """
    pods = _live(observed.pods)
    ready = sum(1 for p in pods if is_ready(p))
    desired = spec.replicas
    problems = rollout_problems(spec, cluster, observed.statefulsets, held, rollout)
    stuck = sorted(
        ((p, m) for p in pods if (m := unschedulable_message(p))), key=lambda s: _pod_name(s[0])
    )
    failing = [(n, m) for p in pods if (m := failing_message(p)) for n in [_pod_name(p)]]
    restarted = [(n, m) for p in pods if (m := restarted_message(p)) for n in [_pod_name(p)]]
    prev = _previous_conditions(previous)

    if apply_error:
        degraded = (True, "ApplyFailed", f"the API server refused a child object: {apply_error}")
    elif stuck:
        degraded = _unschedulable(spec, cluster, stuck, observed)
    elif failing:
        names = ", ".join(sorted(n for n, _ in failing))
        secret = next((h for _, m in failing if (h := secret_problem(spec, m))), None)
        degraded = (
            (True, "SecretInvalid", f"{len(failing)} pod(s) failing ({names}): {secret}")
            if secret
            else (True, "PodsFailing", f"{len(failing)} pod(s) failing ({names}): {failing[0][1]}")
        )
    elif restarted:
        names = ", ".join(sorted(n for n, _ in restarted))
        secret = next((h for _, m in restarted if (h := secret_problem(spec, m))), None)
        degraded = (
            (True, "SecretInvalid", f"{len(restarted)} pod(s) restarted ({names}): {secret}")
            if secret
            else (
                True,
                "PodsRestarted",
                f"{len(restarted)} pod(s) restarted and not ready ({names}): {restarted[0][1]}",
            )
        )
    else:
        degraded = (False, "AsExpected", "all pods schedulable and running")

    if problems:
        progressing = (True, "RollingOut", "; ".join(problems))
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
    eps = endpoints(
        pods, observed.node_labels, placement.zone_key, placement.rack_key, observed.readings
    )
    workers: dict[str, list[int]] = {}
    for e in eps:
        workers.setdefault(e.pod, []).append(e.worker)
    pinned = pinned_condition(spec.pinning, pods, workers, observed.readings)
    # The same reports say what each pod's cache came through its start with.
    restores = pod_restores(workers, observed.readings) if spec.warm_restart.enabled else {}
    # Where each appliance's snapshot is: a replaced pod is steered back there (gate.py).
    nodes = (
        last_nodes(
            recorded_nodes(previous), [p for p in pods if is_ready(p)], pod_names(cluster, spec)
        )
        if spec.warm_restart.enabled
        else []
    )
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
            _condition("Pinned", *pinned, generation, prev, now),
        ],
        endpoints=eps,
        discovery=discovery,
        appliances=appliance_starts(pods, restores, nodes),
        last_nodes=nodes,
        rollout=rollout,
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
    discovery: DiscoveryStatus | None = None,
) -> dict[str, Any]:
    """The status of a cluster whose spec cannot be run: the running pods are left alone
    (and so is the membership they serve, `discovery`)."""
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
        discovery=discovery,
        # Kept as they were, like the pods: a replaced pod still goes back to its node.
        last_nodes=recorded_nodes(previous),
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
        elif a.get("previousNode"):
            message = (
                f"{pod} started empty on {a.get('node') or 'its node'}: its snapshot is on "
                f"{a['previousNode']}, where it ran before"
            )
            events.append(Event("Normal", "StartedEmpty", message))
        else:
            message = (
                f"{pod} started empty on {a.get('node') or 'its node'}: no snapshot there (a "
                "first start, another node, or a stop that was not graceful)"
            )
            events.append(Event("Normal", "StartedEmpty", message))
    return events


def move_events(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[Event]:
    """One event per appliance that came back on another node than the one it ran on (its
    node drained, lost or full), when the status first records it: the cache it had stays
    behind (whether or not the operator can read what the appliance restored)."""
    seen = {(e.pod, e.uid) for e in recorded_nodes(previous)}
    return [
        Event(
            "Warning",
            "Moved",
            f"{e.pod} runs on {e.node} now, not on {e.previous_node} where it ran before: "
            "its snapshot stayed there, so it started without it",
        )
        for e in recorded_nodes(current)
        if e.previous_node and (e.pod, e.uid) not in seen
    ]


def transitions(previous: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[Event]:
    """Events worth posting: conditions whose status or reason changed. Two conditions
    that changed for the same reason with the same message make one event."""
    prev = _previous_conditions(previous)
    events: dict[tuple[str, str], str] = {}  # (reason, message) -> type
    for cond in current.get("conditions") or []:
        kind, value, reason = cond["type"], cond["status"], cond["reason"]
        old = prev.get(kind)
        if old is None and ((kind, value) in _QUIET or reason in _QUIET_REASONS):
            continue
        if old is not None and (old.get("status"), old.get("reason")) == (value, reason):
            continue
        if kind == "Pinned" and value == "Unknown":
            continue  # waiting for reports, or one could not be read: not news
        bad = (
            (kind == "Degraded" and value == "True")
            or (
                kind == "Ready" and value == "False" and old is not None and old["status"] == "True"
            )
            or (kind == "Pinned" and reason == NOT_EXCLUSIVE)
        )
        key = (reason, cond["message"])
        if bad or key not in events:
            events[key] = "Warning" if bad else events.get(key, "Normal")
    return [Event(type=t, reason=r, message=m) for (r, m), t in events.items()]
