"""Status from observed objects: readiness, endpoints, conditions, events. The inputs are
pod and StatefulSet dicts shaped like the API server's (see operator_testkit)."""

from __future__ import annotations

from cacheoperator.appliances import ApplianceReport
from cacheoperator.children import configmap
from cacheoperator.status import (
    Observed,
    compute_status,
    endpoints,
    invalid_status,
    transitions,
)
from operator_testkit import REF, make_pod, make_statefulset, spec_of

T0 = "2030-01-01T00:00:00Z"
T1 = "2030-01-01T00:05:00Z"
NODES = {
    "node-1": {"topology.kubernetes.io/zone": "zone-a", "topology.cache.appliance.io/rack": "r1"},
    "node-2": {"topology.kubernetes.io/zone": "zone-b", "topology.cache.appliance.io/rack": "r7"},
}


def status_for(spec, statefulsets, pods, previous=None, now=T0, **kw):
    return compute_status(
        cluster="demo",
        generation=4,
        spec=spec,
        observed=Observed(statefulsets=statefulsets, pods=pods, node_labels=NODES),
        previous=previous,
        now=now,
        **kw,
    )


def conditions(status):
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def healthy():
    spec = spec_of(replicas=2)
    pods = [
        make_pod("demo-0", node="node-1", host_ip="10.0.0.1"),
        make_pod("demo-1", node="node-2", host_ip="10.0.0.2"),
    ]
    return spec, [make_statefulset("demo", 2)], pods


def test_all_pods_ready_is_phase_ready_with_endpoints_per_pod():
    status = status_for(*healthy())
    assert status["phase"] == "Ready"
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert status["observedGeneration"] == 4
    assert status["selector"] == "cache.appliance.io/cluster=demo"
    assert conditions(status) == {
        "Ready": ("True", "AllPodsReady"),
        "Progressing": ("False", "Complete"),
        "Degraded": ("False", "AsExpected"),
        "Pinned": ("Unknown", "NotReported"),  # no appliance has said yet
    }
    assert status["endpoints"] == [
        {
            "pod": "demo-0",
            "node": "node-1",
            "address": "10.0.0.1",
            "port": 11211,
            "worker": 0,
            "zone": "zone-a",
            "rack": "r1",
        },
        {
            "pod": "demo-1",
            "node": "node-2",
            "address": "10.0.0.2",
            "port": 11211,
            "worker": 0,
            "zone": "zone-b",
            "rack": "r7",
        },
    ]


def test_a_second_pass_over_the_same_world_changes_nothing():
    first = status_for(*healthy())
    second = status_for(*healthy(), previous=first, now=T1)
    assert second == first  # so the operator writes nothing and posts no event
    assert transitions(first, second) == []


def test_transition_time_moves_only_when_a_condition_flips():
    spec, sets, pods = healthy()
    first = status_for(spec, sets, pods)
    pods[1] = make_pod("demo-1", node="node-2", host_ip="10.0.0.2", ready=False)
    second = status_for(spec, sets, pods, previous=first, now=T1)
    times = {c["type"]: c["lastTransitionTime"] for c in second["conditions"]}
    assert times == {"Ready": T1, "Progressing": T1, "Degraded": T0, "Pinned": T0}


def test_each_worker_is_its_own_endpoint_with_tcp_and_udp_ports():
    pod = make_pod("demo-0", workers=3, port=11211, udp_port=11211, node="node-1")
    listed = [(e.port, e.udp_port, e.worker) for e in endpoints([pod], NODES)]
    assert listed == [(11211, 11211, 0), (11212, 11212, 1), (11213, 11213, 2)]


def test_endpoints_use_the_pod_ip_off_the_host_network():
    pod = make_pod("demo-0", host_network=False, host_ip="10.0.0.1", pod_ip="192.168.5.9")
    assert [e.address for e in endpoints([pod], NODES)] == ["192.168.5.9"]


def test_endpoints_list_only_ready_pods_in_partition_then_ordinal_order():
    pods = [
        make_pod("demo-p2-0", partition=2, host_ip="10.0.0.4"),
        make_pod("demo-p1-10", partition=1, host_ip="10.0.0.3"),
        make_pod("demo-p1-2", partition=1, host_ip="10.0.0.2"),
        make_pod("demo-p1-1", partition=1, host_ip="10.0.0.9", ready=False),
    ]
    listed = [(e.pod, e.partition) for e in endpoints(pods, NODES)]
    assert listed == [("demo-p1-2", 1), ("demo-p1-10", 1), ("demo-p2-0", 2)]


def test_terminating_pods_are_not_counted_or_listed():
    spec, sets, pods = healthy()
    pods.append(make_pod("demo-2", deleting=True))
    status = status_for(spec, sets, pods)
    assert status["replicas"] == 2 and len(status["endpoints"]) == 2


def test_nodes_without_labels_leave_zone_and_rack_out():
    pod = make_pod("demo-0", node="node-9")
    (endpoint,) = endpoints([pod], NODES)
    assert endpoint.zone is None and endpoint.rack is None


def test_unschedulable_pods_are_a_degraded_condition_with_the_schedulers_reason():
    spec = spec_of(replicas=3, placement={"strategy": "spread"})
    message = "0/2 nodes are available: 2 node(s) didn't match pod anti-affinity rules."
    pods = [
        make_pod("demo-0", node="node-1", host_ip="10.0.0.1"),
        make_pod("demo-1", node="node-2", host_ip="10.0.0.2"),
        make_pod("demo-2", node=None, ready=False, unschedulable=message),
    ]
    status = status_for(spec, [make_statefulset("demo", 3, ready=2)], pods)
    assert status["phase"] == "Degraded"
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "Unschedulable")
    assert "demo-2" in degraded["message"] and message in degraded["message"]
    # The hint says what the spec needs, in the spec's own terms.
    assert "at most one pod per host" in degraded["message"]
    assert "3 hosts" in degraded["message"]
    assert conditions(status)["Ready"] == ("False", "PodsNotReady")
    assert len(status["endpoints"]) == 2  # the running pods still serve


def test_partition_hint_names_the_rack_label():
    spec = spec_of(replicas=2, placement={"strategy": "partition", "partitions": 2})
    pods = [
        make_pod("demo-p1-0", partition=1),
        make_pod("demo-p2-0", partition=2, node=None, ready=False, unschedulable="no rack"),
    ]
    sets = [make_statefulset("demo-p1", 1), make_statefulset("demo-p2", 1, ready=0)]
    degraded = next(
        c for c in status_for(spec, sets, pods)["conditions"] if c["type"] == "Degraded"
    )
    assert "topology.cache.appliance.io/rack" in degraded["message"]
    assert "2 partitions" in degraded["message"]


PORTS_TAKEN = (
    "0/3 nodes are available: 3 node(s) didn't have free ports for the requested pod ports. "
    "preemption: 0/3 nodes are available: 3 No preemption victims found for incoming pod."
)


def degraded_of(status):
    return next(c for c in status["conditions"] if c["type"] == "Degraded")


def test_a_port_held_by_another_cluster_is_a_port_conflict_naming_it():
    spec = spec_of(replicas=1)
    pods = [make_pod("demo-0", node=None, ready=False, unschedulable=PORTS_TAKEN)]
    others = [
        make_pod(f"other-{i}", cluster="other", namespace="team", node=f"node-{i}") for i in (1, 2)
    ]
    observed = Observed(
        statefulsets=[make_statefulset("demo", 1, ready=0)],
        pods=pods,
        node_labels=NODES,
        host_port_pods=others + pods,
    )
    status = compute_status(
        cluster="demo", generation=4, spec=spec, observed=observed, previous=None, now=T0
    )
    degraded = degraded_of(status)
    assert (degraded["status"], degraded["reason"]) == ("True", "PortConflict")
    assert (
        "11211/TCP and 21211/TCP held by CacheCluster team/other on node-1, node-2"
        in degraded["message"]
    )
    assert "demo-0" in degraded["message"] and "didn't have free ports" in degraded["message"]
    assert "another spec.port" in degraded["message"]
    assert status["phase"] == "Degraded"
    (event,) = [e for e in transitions(None, status) if e.reason == "PortConflict"]
    assert event.type == "Warning"


def test_own_pods_on_every_node_are_no_conflict_and_the_hint_is_the_strategys():
    spec = spec_of(replicas=3)
    pods = [
        make_pod("demo-0", node="node-1"),
        make_pod("demo-1", node="node-2"),
        make_pod("demo-2", node=None, ready=False, unschedulable=PORTS_TAKEN),
    ]
    observed = Observed(pods=pods, node_labels=NODES, host_port_pods=pods)
    degraded = degraded_of(
        compute_status(
            cluster="demo", generation=1, spec=spec, observed=observed, previous=None, now=T0
        )
    )
    assert degraded["reason"] == "Unschedulable"
    assert "the cluster's own pods hold 11211/TCP and 21211/TCP on 2 node(s)" in degraded["message"]
    assert "3 pods need 3 hosts" in degraded["message"]


def test_the_same_port_on_nodes_the_pod_may_not_use_is_no_conflict():
    """Another cluster holds 11211 on node-9, which has no zone label: the stuck pod may not
    go there anyway. The scheduler's reason is the labels, and so is the hint."""
    spec = spec_of(replicas=1)
    message = (
        "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
        "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
    )
    stuck = make_pod(
        "demo-0", node=None, ready=False, unschedulable=message,
        requires_labels=("topology.kubernetes.io/zone",),
    )  # fmt: skip
    other = make_pod("other-0", cluster="other", node="node-9")
    observed = Observed(pods=[stuck], node_labels={"node-9": {}}, host_port_pods=[other])
    degraded = degraded_of(
        compute_status(
            cluster="demo", generation=1, spec=spec, observed=observed, previous=None, now=T0
        )
    )
    assert degraded["reason"] == "Unschedulable"
    assert "other" not in degraded["message"]
    assert (
        "Hint: 1 node(s) lack what the pods require of a node: "
        "a topology.kubernetes.io/zone label (strategy spread)." in degraded["message"]
    )
    assert "at most one pod per host" not in degraded["message"]  # not the strategy's fault


def test_the_hint_follows_each_reason_the_scheduler_gave():
    spec = spec_of(replicas=2, resources={"cpu": 2, "memory": "4Gi"}, tolerations=[])
    message = (
        "0/5 nodes are available: 3 Insufficient cpu, 2 node(s) had untolerated taint "
        "{dedicated: cache}. preemption: 0/5 nodes are available: 5 No preemption victims."
    )
    pods = [make_pod("demo-1", node=None, ready=False, unschedulable=message)]
    degraded = degraded_of(status_for(spec, [], pods))
    hint = degraded["message"].split("Hint: ", 1)[1]
    assert hint.startswith("each pod requests 2 CPU and 4Gi of memory")
    assert "2 node(s) have taints the pods do not tolerate (spec.tolerations)" in hint
    assert "per host" not in hint


def test_a_port_taken_by_pods_out_of_sight_says_so():
    spec = spec_of(replicas=1)
    pods = [make_pod("demo-0", node=None, ready=False, unschedulable=PORTS_TAKEN)]
    observed = Observed(
        pods=pods, host_port_pods=pods, host_port_note="the operator may list pods in cache only"
    )
    degraded = degraded_of(
        compute_status(
            cluster="demo", generation=1, spec=spec, observed=observed, previous=None, now=T0
        )
    )
    assert degraded["reason"] == "Unschedulable"
    assert "could not see which (the operator may list pods in cache only)" in degraded["message"]


def test_a_crash_looping_pod_is_degraded():
    spec, sets, pods = healthy()
    pods[0] = make_pod("demo-0", ready=False, waiting="CrashLoopBackOff")
    status = status_for(spec, sets, pods)
    assert conditions(status)["Degraded"] == ("True", "PodsFailing")
    assert status["phase"] == "Degraded"


SIZING = (
    "cannot size memory: the memory limit 64.0 MiB (cgroup2:/sys/fs/cgroup/memory.max) "
    "leaves 0.0 MiB for items after the baseline 48.9 MiB and the headroom 16.0 MiB; "
    "raise the limit or lower --memory-headroom"
)


def test_a_crash_loop_carries_the_servers_own_reason():
    spec, sets, pods = healthy()
    pods[1] = make_pod("demo-1", ready=False, waiting="CrashLoopBackOff", said=SIZING + "\n")
    degraded = degraded_of(status_for(spec, sets, pods))
    assert degraded["reason"] == "PodsFailing"
    assert degraded["message"] == (
        f"1 pod(s) failing (demo-1): CrashLoopBackOff (exit code 2, Error): {SIZING}"
    )


def test_a_log_tail_as_termination_message_is_cut_to_its_last_lines():
    # FallbackToLogsOnError: a crash before the server wrote a reason leaves its log's tail.
    log = "\n".join(f"line {i}" for i in range(80)) + "\nTraceback: ValueError: bad\n"
    spec, sets, pods = healthy()
    pods[0] = make_pod("demo-0", ready=False, restarted=1, said=log)
    degraded = degraded_of(status_for(spec, sets, pods))
    assert degraded["reason"] == "PodsRestarted"
    assert degraded["message"].endswith(
        "restart(s) in all: line 78 / line 79 / Traceback: ValueError: bad"
    )


def test_a_restarted_pod_is_degraded_until_ready_again():
    """A server that was killed and restarted: the cluster runs below capacity (and that
    shard lost its cache), which is not progress towards anything."""
    spec, sets, pods = healthy()
    pods[1] = make_pod("demo-1", node="node-2", ready=False, restarted=137)
    status = status_for(spec, sets, pods)
    assert status["phase"] == "Degraded"
    assert conditions(status)["Degraded"] == ("True", "PodsRestarted")
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert "demo-1" in degraded["message"] and "exit code 137" in degraded["message"]
    assert conditions(status)["Progressing"] == ("False", "Complete")
    assert [e.reason for e in transitions(status_for(*healthy()), status)] == [
        "PodsNotReady",
        "PodsRestarted",
    ]
    pods[1] = make_pod("demo-1", node="node-2", ready=True, restarted=137)
    assert status_for(spec, sets, pods)["phase"] == "Ready"


def test_a_pod_that_never_ran_is_starting_not_degraded():
    spec, sets, pods = healthy()
    pods[1] = make_pod("demo-1", node="node-2", ready=False)
    status = status_for(spec, sets, pods)
    assert status["phase"] == "Progressing"
    assert conditions(status)["Degraded"] == ("False", "AsExpected")


def test_rollouts_and_scaling_are_progressing():
    spec, _, pods = healthy()
    rolling = [make_statefulset("demo", 2, current="rev-1", update="rev-2", updated=1)]
    assert conditions(status_for(spec, rolling, pods))["Progressing"] == ("True", "RollingOut")
    unseen = [make_statefulset("demo", 2, generation=3, observed=2)]
    assert conditions(status_for(spec, unseen, pods))["Progressing"][0] == "True"
    scaling = [make_statefulset("demo", 1)]  # spec wants 2
    status = status_for(spec, scaling, pods)
    assert conditions(status)["Progressing"] == ("True", "RollingOut")
    assert "resized to 2" in next(
        c["message"] for c in status["conditions"] if c["type"] == "Progressing"
    )
    missing = status_for(spec, [], pods)
    assert "not created yet" in next(
        c["message"] for c in missing["conditions"] if c["type"] == "Progressing"
    )


def test_a_leftover_statefulset_is_reported_while_it_goes():
    spec, sets, pods = healthy()
    status = status_for(spec, [*sets, make_statefulset("demo-p3", 1)], pods)
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert "demo-p3 is being removed" in progressing["message"]


def test_no_pod_ready_yet_is_pending_then_progressing():
    spec = spec_of(replicas=2)
    sets = [make_statefulset("demo", 2, ready=0)]
    none_ready = [make_pod("demo-0", ready=False), make_pod("demo-1", ready=False)]
    status = status_for(spec, sets, none_ready)
    assert status["phase"] == "Pending"
    assert conditions(status)["Progressing"] == ("True", "WaitingForPods")
    one_ready = [make_pod("demo-0"), make_pod("demo-1", ready=False)]
    assert status_for(spec, sets, one_ready)["phase"] == "Progressing"


def test_scaled_to_zero_is_ready():
    status = status_for(spec_of(replicas=0), [make_statefulset("demo", 0)], [])
    assert status["phase"] == "Ready"
    assert status["endpoints"] == []


def test_a_refused_child_object_is_degraded():
    status = status_for(*healthy(), apply_error="HTTP 422: nodeSelector key is invalid")
    assert conditions(status)["Degraded"] == ("True", "ApplyFailed")
    assert status["phase"] == "Degraded"


def test_invalid_spec_keeps_reporting_the_running_pods():
    _, _, pods = healthy()
    status = invalid_status(
        cluster="demo",
        generation=5,
        problems=["spec.port: Input should be greater than or equal to 1024"],
        observed=Observed(pods=pods, node_labels=NODES),
        previous=None,
        now=T0,
    )
    assert status["phase"] == "Invalid"
    assert (status["readyReplicas"], len(status["endpoints"])) == (2, 2)
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "spec.port" in degraded["message"]


def test_events_are_posted_for_transitions_only():
    spec, sets, pods = healthy()
    first = status_for(spec, sets, pods)
    # First report: only the news (Ready), not the quiet conditions.
    assert [(e.type, e.reason) for e in transitions(None, first)] == [("Normal", "AllPodsReady")]
    pods[1] = make_pod("demo-1", ready=False, waiting="CrashLoopBackOff")
    second = status_for(spec, sets, pods, previous=first, now=T1)
    assert [(e.type, e.reason) for e in transitions(first, second)] == [
        ("Warning", "PodsNotReady"),
        ("Warning", "PodsFailing"),
    ]
    # Same state again, different counts in the messages: no new events.
    assert transitions(second, status_for(spec, sets, pods, previous=second, now=T1)) == []


def test_an_invalid_spec_makes_one_warning_not_one_per_condition():
    spec, sets, pods = healthy()
    ready = status_for(spec, sets, pods)
    invalid = invalid_status(
        cluster="demo",
        generation=5,
        problems=["spec.port: too low"],
        observed=Observed(pods=pods, node_labels=NODES),
        previous=ready,
        now=T1,
    )
    events = transitions(ready, invalid)
    assert [(e.type, e.reason) for e in events] == [
        ("Warning", "InvalidSpec"),
        ("Normal", "InvalidSpec"),
    ]
    assert "spec.port" in events[0].message


def test_a_new_cluster_reports_its_rollout_not_that_it_is_not_ready_yet():
    spec = spec_of(replicas=2)
    status = status_for(spec, [], [])
    assert [(e.type, e.reason) for e in transitions(None, status)] == [("Normal", "RollingOut")]


def test_long_scheduler_messages_are_cut_to_the_schema_limit():
    spec = spec_of(replicas=1)
    pods = [make_pod("demo-0", node=None, ready=False, unschedulable="x" * 10000)]
    status = status_for(spec, [make_statefulset("demo", 1, ready=0)], pods)
    assert all(len(c["message"]) <= 4096 for c in status["conditions"])


def test_what_the_appliances_report_goes_on_their_endpoints_and_into_pinned():
    spec, sets, pods = healthy()
    source = "cgroup2:/sys/fs/cgroup/kubepods/pod1/c1/memory.max"
    readings = {
        ("demo-0", 0): ApplianceReport(
            frozenset({1}), frozenset({1}), frozenset({0, 1}), 1 << 30, source
        ),
        ("demo-1", 0): ApplianceReport(
            frozenset({1}), frozenset({1}), frozenset({0, 1}), 3 << 20, source
        ),
    }
    observed = Observed(statefulsets=sets, pods=pods, node_labels=NODES, readings=readings)
    first = status_for(spec, sets, pods)
    status = compute_status(
        cluster="demo", generation=4, spec=spec, observed=observed, previous=first, now=T1
    )
    assert [(e["pod"], e["cpus"], e["memoryLimit"]) for e in status["endpoints"]] == [
        ("demo-0", "1", "1Gi"),
        ("demo-1", "1", "3Mi"),
    ]
    assert status["endpoints"][0]["memoryLimitSource"] == source
    assert conditions(status)["Pinned"] == ("True", "Exclusive")
    assert [(e.type, e.reason) for e in transitions(first, status)] == [("Normal", "Exclusive")]

    # demo-1 restarts on a node without the static CPU manager: a Warning names it.
    readings[("demo-1", 0)] = ApplianceReport(
        frozenset({0, 1}), frozenset({0, 1}), frozenset({0, 1})
    )
    observed = Observed(statefulsets=sets, pods=pods, node_labels=NODES, readings=readings)
    later = compute_status(
        cluster="demo", generation=4, spec=spec, observed=observed, previous=status, now=T1
    )
    (event,) = transitions(status, later)
    assert (event.type, event.reason) == ("Warning", "NotExclusive")
    assert "(demo-1)" in event.message


def test_the_configmap_lists_membership_not_what_appliances_report():
    spec, _, pods = healthy()
    eps = endpoints(pods, NODES)
    reported = [e.model_copy(update={"cpus": "3", "memory_limit": "1Gi"}) for e in eps]
    assert configmap(REF, spec, reported) == configmap(REF, spec, eps)
