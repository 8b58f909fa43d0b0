"""Rollouts go one StatefulSet at a time (rollout.py): which new templates wait, and why."""

from __future__ import annotations

import copy
import threading

from prometheus_client import generate_latest

from cacheoperator.appliances import Restore
from cacheoperator.children import desired_objects
from cacheoperator.metrics import OperatorMetrics
from cacheoperator.naming import LABEL_STATEFULSET
from cacheoperator.pods import termination_grace_seconds
from cacheoperator.reconcile import ClusterController
from cacheoperator.rollout import (
    REVISION_LABEL,
    TEMPLATE_HASH,
    deadline_seconds,
    held_statefulsets,
    plan_rollout,
    settled,
)
from cacheoperator.status import Observed, compute_status
from operator_testkit import REF, make_pod, make_statefulset, of_kind, spec_of

IMAGE = "cache-appliance:1"
PARTITIONS = {"strategy": "partition", "partitions": 3}


def desired(**fields):
    spec = spec_of(**{"replicas": 6, "placement": PARTITIONS, **fields})
    return of_kind(desired_objects(REF, spec, IMAGE), "StatefulSet")


def observed_from(sets, **status):
    """The StatefulSets as the API server shows them once these were applied."""
    out = []
    for sts in sets:
        obs = make_statefulset(sts["metadata"]["name"], sts["spec"]["replicas"], **status)
        obs["metadata"]["annotations"] = dict(sts["metadata"]["annotations"])
        out.append(obs)
    return out


def test_an_unchanged_or_new_cluster_holds_nothing():
    sets = desired()
    assert held_statefulsets(sets, []) == {}  # all created at once
    assert held_statefulsets(sets, observed_from(sets)) == {}
    assert held_statefulsets(sets, observed_from(sets[:1])) == {}  # p2, p3 are new


def test_a_changed_template_goes_to_one_statefulset_at_a_time():
    before = observed_from(desired())
    after = desired(image="cache-appliance:2")
    assert held_statefulsets(after, before) == {"demo-p2": "demo-p1", "demo-p3": "demo-p1"}
    # demo-p1 took it and is replacing its pods: the others wait for it.
    rolling = [*observed_from(after[:1], update="rev-2", updated=0), *before[1:]]
    assert not settled(rolling[0])
    assert held_statefulsets(after, rolling) == {"demo-p2": "demo-p1", "demo-p3": "demo-p1"}
    # demo-p1 is done and ready: demo-p2's turn.
    done = [*observed_from(after[:1]), *before[1:]]
    assert held_statefulsets(after, done) == {"demo-p3": "demo-p2"}


def test_a_partition_that_is_already_broken_takes_its_fix_at_once():
    before = observed_from(desired())
    before[2]["status"]["readyReplicas"] = 0  # demo-p3's pods fail
    fixed = desired(image="cache-appliance:fixed")
    assert held_statefulsets(fixed, before) == {"demo-p1": "demo-p3", "demo-p2": "demo-p3"}


def test_replica_changes_alone_are_not_held():
    before = observed_from(desired())
    assert held_statefulsets(desired(replicas=9), before) == {}


def test_a_statefulset_without_the_annotation_counts_as_changed():
    before = observed_from(desired())
    for sts in before:
        del sts["metadata"]["annotations"][TEMPLATE_HASH]  # made by an older operator
    assert set(held_statefulsets(desired(), before)) == {"demo-p2", "demo-p3"}


def test_the_status_says_who_waits_for_whom():
    after = desired(image="cache-appliance:2")
    spec = spec_of(replicas=6, placement=PARTITIONS, image="cache-appliance:2")
    status = compute_status(
        cluster="demo",
        generation=2,
        spec=spec,
        observed=Observed(statefulsets=observed_from(after[:1], update="rev-2", updated=1)),
        previous=None,
        now="2030-01-01T00:00:00Z",
        held={"demo-p2": "demo-p1", "demo-p3": "demo-p1"},
    )
    (progressing,) = [c for c in status["conditions"] if c["type"] == "Progressing"]
    assert progressing["reason"] == "RollingOut"
    assert "StatefulSet demo-p1 is rolling out: 1/2 pods updated" in progressing["message"]
    assert "StatefulSet demo-p2 waits for demo-p1 to finish rolling out" in progressing["message"]


# ---- waits with a bound: restore reports, progress, the deadline ---------------------------

T0 = "2030-01-01T00:00:00Z"


def at(seconds: int) -> str:
    return f"2030-01-01T{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z"


def pods_of(sts: str, revision: str, *, ready=True, waiting=None, unschedulable=None, n=2):
    """The pods of one StatefulSet as the controller labels them."""
    out = []
    for ordinal in range(n):
        pod = make_pod(
            f"{sts}-{ordinal}", ready=ready, waiting=waiting, unschedulable=unschedulable
        )
        pod["metadata"]["labels"] |= {LABEL_STATEFULSET: sts, REVISION_LABEL: revision}
        out.append(pod)
    return out


AFTER = desired(image="cache-appliance:2")
BEFORE = observed_from(desired())
OLD_PODS = pods_of("demo-p2", "rev-1") + pods_of("demo-p3", "rev-1")
# demo-p1 replaced both its pods and they are ready: the controller's part is done.
P1_DONE = [*observed_from(AFTER[:1], current="rev-2", update="rev-2"), *BEFORE[1:]]
P1_PODS = pods_of("demo-p1", "rev-2")


def test_the_next_statefulset_waits_until_the_new_appliances_have_reported():
    first = plan_rollout(AFTER, BEFORE, pods=pods_of("demo-p1", "rev-1") + OLD_PODS, now=T0)
    assert (first.statefulset, first.waiting_for, first.since) == ("demo-p1", "pods", T0)
    previous = first.status(spec_of(replicas=6, placement=PARTITIONS), BEFORE, [])
    # Settled, but no report read yet from its new appliances: demo-p2 still waits.
    waiting = plan_rollout(
        AFTER, P1_DONE, pods=P1_PODS + OLD_PODS, restores={}, previous=previous, now=at(5)
    )
    assert waiting.held == {"demo-p2": "demo-p1", "demo-p3": "demo-p1"}
    assert (waiting.statefulset, waiting.waiting_for) == ("demo-p1", "restores")
    assert waiting.recheck_in == 600 and waiting.since == at(5) and not waiting.events
    # One reported, the other not yet: still waiting.
    one = {"demo-p1-0": Restore("restored", 500)}
    assert plan_rollout(
        AFTER, P1_DONE, pods=P1_PODS + OLD_PODS, restores=one, previous=previous, now=at(6)
    ).held == {"demo-p2": "demo-p1", "demo-p3": "demo-p1"}
    # Both in (a refusal or an unreadable report counts: it is what the appliance said).
    both = one | {"demo-p1-1": Restore("unknown")}
    going = plan_rollout(
        AFTER, P1_DONE, pods=P1_PODS + OLD_PODS, restores=both, previous=previous, now=at(7)
    )
    assert going.held == {"demo-p3": "demo-p2"}
    assert (going.statefulset, going.waiting_for, going.since) == ("demo-p2", "pods", at(7))
    # Without warm restart reports (restores=None) nothing waits for them.
    assert plan_rollout(AFTER, P1_DONE, pods=P1_PODS, previous=previous, now=at(5)).held == {
        "demo-p3": "demo-p2"
    }


def test_a_step_without_progress_is_passed_over_at_its_deadline_and_says_so():
    spec = spec_of(replicas=6, placement=PARTITIONS, image="cache-appliance:2")
    # demo-p1 took the template; its first new pod finds no node (its rack is gone).
    stuck_sets = [*observed_from(AFTER[:1], update="rev-2", updated=0, ready=1), *BEFORE[1:]]
    stuck_pods = [
        pods_of("demo-p1", "rev-1", n=1)[0],
        pods_of("demo-p1", "rev-2", ready=False, unschedulable="0/3 nodes are available")[1],
        *OLD_PODS,
    ]
    start = plan_rollout(AFTER, stuck_sets, pods=stuck_pods, now=T0)
    previous = start.status(spec, stuck_sets, stuck_pods)
    assert previous.statefulset == "demo-p1" and previous.since == T0
    before = plan_rollout(AFTER, stuck_sets, pods=stuck_pods, previous=previous, now=at(599))
    assert before.held == {"demo-p2": "demo-p1", "demo-p3": "demo-p1"}
    assert before.recheck_in == 1 and before.since == T0 and not before.events
    late = plan_rollout(AFTER, stuck_sets, pods=stuck_pods, previous=previous, now=at(600))
    assert late.held == {"demo-p3": "demo-p2"}
    assert late.timed_out == ["demo-p1"]
    (event,) = late.events
    assert (event.type, event.reason) == ("Warning", "RolloutDeadlineExceeded")
    assert event.message == (
        "StatefulSet demo-p1 made no progress for 600 s: the rollout goes on with "
        "StatefulSet demo-p2 without it"
    )
    # Next pass: demo-p2 rolls; demo-p3 waits for it, not for the StatefulSet passed over.
    rolling = [stuck_sets[0], *observed_from(AFTER[1:2], update="rev-2", updated=0), BEFORE[2]]
    after = late.status(spec, stuck_sets, stuck_pods)
    nxt = plan_rollout(AFTER, rolling, pods=stuck_pods, previous=after, now=at(601))
    assert nxt.held == {"demo-p3": "demo-p2"} and nxt.timed_out == ["demo-p1"]
    assert not nxt.events  # said once
    status = compute_status(
        cluster="demo",
        generation=2,
        spec=spec,
        observed=Observed(statefulsets=rolling, pods=stuck_pods),
        previous=None,
        now=at(601),
        held=nxt.held,
        rollout=nxt.status(spec, rolling, stuck_pods),
    )
    (progressing,) = [c for c in status["conditions"] if c["type"] == "Progressing"]
    assert (
        "StatefulSet demo-p1 made no progress for 600 s: the rollout went on without it"
        in progressing["message"]
    )
    assert status["rollout"]["timedOut"] == ["demo-p1"]


def test_progress_restarts_the_clock():
    spec = spec_of(replicas=6, placement=PARTITIONS, image="cache-appliance:2")
    half = [*observed_from(AFTER[:1], update="rev-2", updated=1), *BEFORE[1:]]
    one_new = [pods_of("demo-p1", "rev-2", n=1)[0], pods_of("demo-p1", "rev-1")[1], *OLD_PODS]
    earlier = plan_rollout(AFTER, half, pods=pods_of("demo-p1", "rev-1") + OLD_PODS, now=T0)
    previous = earlier.status(spec, half, pods_of("demo-p1", "rev-1") + OLD_PODS)
    assert previous.updated_replicas == 0
    plan = plan_rollout(AFTER, half, pods=one_new, previous=previous, now=at(590))
    assert plan.since == at(590) and plan.recheck_in == 600  # a new appliance is ready
    assert plan.status(spec, half, one_new).updated_replicas == 1


def test_a_template_whose_new_pods_fail_goes_no_further():
    spec = spec_of(replicas=6, placement=PARTITIONS, image="cache-appliance:2")
    broken_sets = [*observed_from(AFTER[:1], update="rev-2", updated=1, ready=1), *BEFORE[1:]]
    crashing = [
        pods_of("demo-p1", "rev-2", ready=False, waiting="CrashLoopBackOff", n=1)[0],
        pods_of("demo-p1", "rev-1")[1],
        *OLD_PODS,
    ]
    previous = plan_rollout(AFTER, broken_sets, pods=crashing, now=T0).status(
        spec, broken_sets, crashing
    )
    plan = plan_rollout(AFTER, broken_sets, pods=crashing, previous=previous, now=at(3600))
    assert plan.held == {"demo-p2": "demo-p1", "demo-p3": "demo-p1"}
    assert not plan.events and not plan.timed_out and plan.recheck_in is None


def test_missing_restore_reports_are_waited_for_until_the_deadline():
    previous = plan_rollout(AFTER, BEFORE, pods=OLD_PODS, now=T0).status(
        spec_of(replicas=6, placement=PARTITIONS), BEFORE, []
    )
    waiting = plan_rollout(
        AFTER, P1_DONE, pods=P1_PODS + OLD_PODS, restores={}, previous=previous, now=at(10)
    )
    previous = waiting.status(spec_of(replicas=6, placement=PARTITIONS), P1_DONE, P1_PODS)
    assert previous.since == at(10)  # the wait for reports is a wait of its own
    late = plan_rollout(
        AFTER, P1_DONE, pods=P1_PODS + OLD_PODS, restores={}, previous=previous, now=at(610)
    )
    assert late.held == {"demo-p3": "demo-p2"} and late.timed_out == []
    (event,) = late.events
    assert event.message == (
        "the restore reports of demo-p1-0, demo-p1-1 (StatefulSet demo-p1) did not come "
        "within 600 s: the rollout goes on with StatefulSet demo-p2 without it"
    )


def test_one_statefulset_rolling_alone_is_reported_once_at_its_deadline():
    spec = spec_of(replicas=2, image="cache-appliance:2")
    (sts,) = of_kind(desired_objects(REF, spec, IMAGE), "StatefulSet")
    (stuck,) = observed_from([sts], update="rev-2", updated=1, ready=1)
    pods = [*pods_of("demo", "rev-2", n=1), *pods_of("demo", "rev-2", ready=False, n=2)[1:]]
    previous = plan_rollout([sts], [stuck], pods=pods, now=T0).status(spec, [stuck], pods)
    assert (previous.statefulset, previous.held) == ("demo", [])
    late = plan_rollout([sts], [stuck], pods=pods, previous=previous, now=at(600))
    assert late.held == {} and late.timed_out == ["demo"]
    (event,) = late.events
    assert event.message.endswith(": no other StatefulSet waits for it")
    again = plan_rollout(
        [sts], [stuck], pods=pods, previous=late.status(spec, [stuck], pods), now=at(700)
    )
    assert not again.events and again.recheck_in is None


def test_the_deadline_follows_the_time_one_appliance_may_take_to_restart():
    assert deadline_seconds(spec_of()) == 600  # 1Gi: 41 s grace, far below
    # 64Gi: a save of 687 s at the grace period's rate, as long for the restore.
    big = spec_of(resources={"cpu": 1, "memory": "64Gi"})
    assert deadline_seconds(big) == 2 * termination_grace_seconds(big) + 120
    assert deadline_seconds(spec_of(rollout={"progressDeadlineSeconds": 60})) == 60
    assert deadline_seconds(spec_of(warmRestart={"enabled": False})) == 600


# ---- the pass: what the operator does with the plan ---------------------------------------


class Api:
    """An API server holding one CacheCluster, its StatefulSets and pods; records which
    StatefulSets were given a new template."""

    def __init__(self, cluster, statefulsets, pods):
        self.cluster, self.pods = cluster, pods
        self.statefulsets = {s["metadata"]["name"]: copy.deepcopy(s) for s in statefulsets}
        self.applied: list[str] = []
        self.passes = 0  # reads of the CacheCluster: one per pass
        self.written = threading.Event()  # a pass wrote the status
        self.second_pass = threading.Event()

    def get(self, resource, namespace, name):
        if resource.plural != "cacheclusters":
            return None
        self.passes += 1
        if self.passes >= 2:
            self.second_pass.set()
        return self.cluster

    def list(self, resource, namespace, label_selector="", field_selector=""):
        if resource.plural == "statefulsets":
            return list(self.statefulsets.values())
        return list(self.pods) if resource.plural == "pods" else []

    def apply(self, obj):
        if obj["kind"] == "StatefulSet":
            sts = self.statefulsets[obj["metadata"]["name"]]
            if sts["metadata"]["annotations"] != obj["metadata"]["annotations"]:
                self.applied.append(obj["metadata"]["name"])
                sts["metadata"]["generation"] += 1  # a new template: the controller lags
            sts["metadata"]["annotations"] = dict(obj["metadata"]["annotations"])
        return obj

    def patch_status(self, resource, namespace, name, status):
        self.cluster["status"] = status
        self.written.set()


def stuck_cluster(since: str, now: str):
    """demo-p1 took the new template an hour ago; its new pod finds no node."""
    spec = {"replicas": 6, "placement": PARTITIONS, "image": "cache-appliance:2"}
    sets = [*observed_from(AFTER[:1], update="rev-2", updated=0, ready=1), *BEFORE[1:]]
    pods = [
        pods_of("demo-p1", "rev-1", n=1)[0],
        pods_of("demo-p1", "rev-2", ready=False, unschedulable="0/3 nodes are available")[1],
        *OLD_PODS,
    ]
    rollout = {
        "replicas": 6,
        "updatedReplicas": 0,
        "statefulset": "demo-p1",
        "waitingFor": "pods",
        "since": since,
        "deadlineSeconds": 600,
    }
    cluster = {
        "metadata": {"name": "demo", "namespace": "cache", "uid": REF.uid, "generation": 2},
        "spec": spec,
        "status": {"rollout": rollout},
    }
    api = Api(cluster, sets, pods)
    posted: list = []
    metrics = OperatorMetrics()
    controller = ClusterController(
        api, IMAGE, post_event=lambda body, e: posted.append(e), metrics=metrics, clock=lambda: now
    )
    return api, controller, posted, metrics


def test_a_pass_past_the_deadline_hands_on_the_template_and_says_so_everywhere():
    api, controller, posted, metrics = stuck_cluster(since=T0, now=at(600))
    controller.reconcile("cache", "demo")
    assert api.written.wait(5)
    assert "demo-p2" in api.applied and "demo-p3" not in api.applied
    assert [(e.type, e.reason) for e in posted if e.reason == "RolloutDeadlineExceeded"] == [
        ("Warning", "RolloutDeadlineExceeded")
    ]
    rollout = api.cluster["status"]["rollout"]
    assert rollout["timedOut"] == ["demo-p1"] and rollout["statefulset"] == "demo-p2"
    assert rollout["held"] == ["demo-p3"] and rollout["updatedReplicas"] == 0
    text = generate_latest(metrics.registry).decode()
    assert (
        'cacheoperator_rollout_timed_out_statefulsets{cachecluster="demo",namespace="cache"} 1.0'
        in text
    )
    assert 'cacheoperator_rollout_in_progress{cachecluster="demo",namespace="cache"} 1.0' in text
    assert 'cacheoperator_rollout_progress{cachecluster="demo",namespace="cache"} 0.0' in text


def test_a_pass_before_the_deadline_holds_and_comes_back_at_it():
    api, controller, posted, _ = stuck_cluster(since=T0, now=at(100))
    outcome = controller.reconcile_body(api.cluster)
    assert "demo-p2" not in api.applied and "demo-p3" not in api.applied
    assert not [e for e in posted if e.reason == "RolloutDeadlineExceeded"]
    assert outcome.recheck_in == 500  # the deadline: a pass must look then
    assert api.cluster["status"]["rollout"]["since"] == T0
    # A step that sends no events is looked at again when its deadline passes, by itself.
    api, controller, _, _ = stuck_cluster(since=T0, now=at(599))
    controller.reconcile("cache", "demo")
    assert api.second_pass.wait(5), "no pass at the deadline"
