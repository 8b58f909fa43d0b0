"""One appliance at a time: which StatefulSets may take a new pod template in this pass,
how long the rollout waits, and where it is.

Within one StatefulSet the controller already replaces one pod at a time and waits until the
new one is Ready; a cache server with warm restart opens its port only after its restore,
so Ready means restored. Across StatefulSets (one per partition) nothing orders the
rollouts, so a spec change would restart one pod of every partition at once. The operator
therefore hands a changed template to one StatefulSet at a time: the next one gets its new
template only when every StatefulSet of the cluster has settled and, with warm restart, the
new appliances of the one before have reported what they restored (appliances.py).

Every wait has a bound: a step that makes no progress (no appliance ready on the new
template, no report) for the deadline is passed over, the next StatefulSet goes, and the
status and an event say so. Not when the new pods of that step fail (crash, restart): a
template that breaks appliances is not handed to more of them.

Pure functions over the desired and observed StatefulSet and pod dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cacheoperator.appliances import Restore
from cacheoperator.models import CacheClusterSpec, RolloutStatus
from cacheoperator.naming import LABEL_STATEFULSET
from cacheoperator.pods import termination_grace_seconds
from cacheoperator.status import (
    Event,
    failing_message,
    is_ready,
    is_terminating,
    restarted_message,
)

TEMPLATE_HASH = "cache.appliance.io/template-hash"
REVISION_LABEL = "controller-revision-hash"  # the StatefulSet controller's, on every pod
# A step's bound when the spec sets none: Kubernetes' own default for a Deployment's
# progressDeadlineSeconds, or what one appliance's save, restart and restore may take.
DEFAULT_DEADLINE_SECONDS = 600
START_MARGIN_SECONDS = 120  # scheduling, an image pull, the init container
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def template_hash(template: Mapping[str, Any]) -> str:
    """A short digest of a pod template as the operator builds it (before API defaults)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def deadline_seconds(spec: CacheClusterSpec) -> int:
    """How long one step may go without progress. The startup probe gives a restore as
    long as the grace period gives a save, hence twice the grace period."""
    if spec.rollout.progress_deadline_seconds is not None:
        return spec.rollout.progress_deadline_seconds
    restart = 2 * termination_grace_seconds(spec) + START_MARGIN_SECONDS
    return max(DEFAULT_DEADLINE_SECONDS, restart)


def _name(obj: Mapping[str, Any]) -> str:
    return obj["metadata"]["name"]


def _applied_hash(sts: Mapping[str, Any]) -> str | None:
    return ((sts.get("metadata") or {}).get("annotations") or {}).get(TEMPLATE_HASH)


def settled(sts: Mapping[str, Any]) -> bool:
    """The StatefulSet's controller has seen its spec, and every pod runs the current
    template and is ready."""
    meta, spec, st = sts.get("metadata") or {}, sts.get("spec") or {}, sts.get("status") or {}
    replicas = spec.get("replicas", 0)
    if st.get("observedGeneration", 0) < meta.get("generation", 0):
        return False
    if st.get("updateRevision") and st.get("currentRevision") != st.get("updateRevision"):
        return False
    return st.get("updatedReplicas", 0) >= replicas and st.get("readyReplicas", 0) >= replicas


def _on_update_revision(pod: Mapping[str, Any], sts: Mapping[str, Any]) -> bool:
    meta, st = sts.get("metadata") or {}, sts.get("status") or {}
    if st.get("observedGeneration", 0) < meta.get("generation", 0):
        return False  # its controller has not seen the new template yet
    revision = ((pod.get("metadata") or {}).get("labels") or {}).get(REVISION_LABEL)
    return revision is not None and revision == st.get("updateRevision")


def _pods_of(name: str, pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [
        p
        for p in pods
        if ((p.get("metadata") or {}).get("labels") or {}).get(LABEL_STATEFULSET) == name
        and not is_terminating(p)
    ]


def updated_pods(
    statefulsets: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    held: Sequence[str] = (),
) -> list[str]:
    """The ready pods that run their StatefulSet's current template (none of a StatefulSet
    whose new template is held: they run the old one)."""
    out = []
    for sts in statefulsets:
        if _name(sts) in held:
            continue
        out += [
            _name(p)
            for p in _pods_of(_name(sts), pods)
            if is_ready(p) and _on_update_revision(p, sts)
        ]
    return sorted(out)


def _failing(sts: Mapping[str, Any], pods: Sequence[Mapping[str, Any]]) -> list[str]:
    """Its pods on the new template that crash or were restarted: the template is suspect."""
    return sorted(
        _name(p)
        for p in _pods_of(_name(sts), pods)
        if _on_update_revision(p, sts) and (failing_message(p) or restarted_message(p))
    )


def parse_time(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text or "", TIME_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        return None


@dataclass
class Plan:
    """What a pass does about the rollout: the StatefulSets whose new template waits (name
    -> what it waits for), where the rollout is (for the status), events to post, and in
    how many seconds the deadline of the current wait passes (then a pass must look)."""

    held: dict[str, str] = field(default_factory=dict)
    statefulset: str | None = None
    waiting_for: str | None = None
    since: str | None = None
    deadline: int = DEFAULT_DEADLINE_SECONDS
    timed_out: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    recheck_in: float | None = None

    def status(
        self,
        spec: CacheClusterSpec,
        statefulsets: Sequence[Mapping[str, Any]],
        pods: Sequence[Mapping[str, Any]],
    ) -> RolloutStatus:
        """The status' account of it, with the counts from what a pass observed."""
        return RolloutStatus(
            replicas=spec.replicas,
            updated_replicas=len(updated_pods(statefulsets, pods, list(self.held))),
            statefulset=self.statefulset,
            waiting_for=self.waiting_for,
            since=self.since,
            deadline_seconds=self.deadline,
            held=sorted(self.held),
            timed_out=self.timed_out,
        )


def previous_rollout(status: Mapping[str, Any] | None) -> RolloutStatus | None:
    raw = (status or {}).get("rollout")
    try:
        return RolloutStatus.model_validate(raw) if raw else None
    except ValueError:
        return None


def plan_rollout(
    desired: Sequence[Mapping[str, Any]],
    observed: Sequence[Mapping[str, Any]],
    *,
    pods: Sequence[Mapping[str, Any]] = (),
    restores: Mapping[str, Restore] | None = None,
    previous: RolloutStatus | None = None,
    now: str = "",
    deadline: int = DEFAULT_DEADLINE_SECONDS,
) -> Plan:
    """Which StatefulSets with a changed template wait this pass, and for what.

    A StatefulSet that does not exist yet, or whose template is unchanged, is never held.
    Of those with a changed template, one that is unsettled already (its pods are being
    replaced or are failing) goes on, so that a fix for a broken partition is never held
    behind it; otherwise the first in order goes, once all StatefulSets have settled and,
    given ``restores`` (pod -> its report, warm restart), the ready new pods of the step
    before have all reported. ``previous``: the status' last account, which says since
    when the current wait has lasted; past ``deadline`` seconds without progress the next
    StatefulSet goes anyway (not when the waited-for one's new pods fail).

    ``pods`` are needed only while something is held or rolling; ``now`` as the status
    writes times.
    """
    current = {_name(s): s for s in observed}
    changed = [
        _name(d)
        for d in desired
        if _name(d) in current and _applied_hash(current[_name(d)]) != _applied_hash(d)
    ]
    # Passed over before, and still not settled (and not given yet another template).
    timed_out = [
        n
        for n in (previous.timed_out if previous else [])
        if n in current and not settled(current[n]) and n not in changed
    ]
    busy = sorted(n for n, s in current.items() if not settled(s) and n not in timed_out)
    plan = Plan(deadline=deadline, timed_out=timed_out)
    awaited: list[str] = []  # new pods of the step before that have not reported yet
    before = previous.statefulset if previous else None
    # The step before finished (settled, nothing new for it): have its new pods reported?
    finished = before is not None and before in current and before not in {*busy, *changed}
    if restores is not None and changed and finished and before is not None:
        awaited = [
            _name(p)
            for p in _pods_of(before, pods)
            if is_ready(p) and _on_update_revision(p, current[before]) and _name(p) not in restores
        ]
    going = [n for n in changed if n in busy]  # a fix for a step that is unsettled already
    waiting = not going
    if going:
        plan.statefulset = going[0]
    elif busy:
        plan.statefulset = busy[0]
    elif awaited:
        plan.statefulset, plan.waiting_for = before, "restores"
    elif changed:
        going, waiting = changed[:1], False
        plan.statefulset = going[0]
    if plan.statefulset is None:
        return plan
    plan.waiting_for = plan.waiting_for or "pods"
    # Progress: appliances ready on a current template (none of a changed StatefulSet).
    updated = len(updated_pods(observed, pods, changed)) if pods else None
    plan.since = _since(previous, plan, updated, now)
    waited = _seconds_between(plan.since, now)
    if waiting and waited is not None:
        failing = _failing(current[plan.statefulset], pods) if plan.waiting_for == "pods" else []
        if failing:
            pass  # a template that breaks appliances goes no further: no deadline
        elif waited < deadline:
            plan.recheck_in = max(deadline - waited, 1.0)
        else:
            going = changed[:1]
            plan.events.append(_timed_out_event(plan, going, deadline, awaited))
            if plan.waiting_for == "pods":
                plan.timed_out = sorted({*timed_out, plan.statefulset})
            if going:
                plan.statefulset, plan.waiting_for, plan.since = going[0], "pods", now
    waits_for = ", ".join(going or busy or [plan.statefulset])
    plan.held = {name: waits_for for name in changed if name not in going}
    return plan


def _since(previous: RolloutStatus | None, plan: Plan, updated: int | None, now: str) -> str:
    """When the wait began: kept while the rollout waits for the same thing and no more
    appliances run the new template than the status counted last."""
    if (
        previous is not None
        and previous.since
        and previous.statefulset == plan.statefulset
        and previous.waiting_for == plan.waiting_for
        and (updated is None or updated == previous.updated_replicas)
    ):
        return previous.since
    return now


def _seconds_between(since: str | None, now: str) -> float | None:
    began, at = parse_time(since), parse_time(now)
    if began is None or at is None:
        return None
    return (at - began).total_seconds()


def _timed_out_event(
    plan: Plan, going: Sequence[str], deadline: int, awaited: Sequence[str]
) -> Event:
    if plan.waiting_for == "restores":
        what = (
            f"the restore reports of {', '.join(awaited)} (StatefulSet {plan.statefulset}) "
            f"did not come within {deadline} s"
        )
    else:
        what = f"StatefulSet {plan.statefulset} made no progress for {deadline} s"
    then = (
        f"the rollout goes on with StatefulSet {going[0]} without it"
        if going
        else "no other StatefulSet waits for it"
    )
    return Event("Warning", "RolloutDeadlineExceeded", f"{what}: {then}")


def needs_pods(desired: Sequence[Mapping[str, Any]], observed: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a plan must see the pods: a template changed or a StatefulSet is unsettled
    (otherwise nothing rolls, and a pass spares the read)."""
    current = {_name(s): s for s in observed}
    return any(not settled(s) for s in observed) or any(
        _name(d) in current and _applied_hash(current[_name(d)]) != _applied_hash(d)
        for d in desired
    )


def held_statefulsets(
    desired: Sequence[Mapping[str, Any]], observed: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """StatefulSets whose new template waits this pass, each with what it waits for (the
    plan without reports or a deadline)."""
    return plan_rollout(desired, observed).held
