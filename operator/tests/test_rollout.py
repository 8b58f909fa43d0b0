"""Rollouts go one StatefulSet at a time (rollout.py): which new templates wait, and why."""

from __future__ import annotations

from cacheoperator.children import desired_objects
from cacheoperator.rollout import TEMPLATE_HASH, held_statefulsets, settled
from cacheoperator.status import Observed, compute_status
from operator_testkit import REF, make_statefulset, of_kind, spec_of

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
