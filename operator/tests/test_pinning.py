"""The Pinned condition from what appliances report: exclusive CPUs from the static CPU
manager, the shared pool of a kubelet without it, pinning that did not happen, and
appliances that have not answered yet."""

from __future__ import annotations

import pytest

from cacheoperator.appliances import ApplianceReport
from cacheoperator.pinning import cpu_request, pinned_condition, pod_verdict
from operator_testkit import make_pod

ONLINE = frozenset(range(8))


def report(cpus, allowed, online=ONLINE, limit=1 << 30):
    return ApplianceReport(
        cpus=frozenset(cpus),
        cpus_allowed=frozenset(allowed),
        cpus_online=online,
        memory_limit=limit,
        memory_limit_source="cgroup2:/sys/fs/cgroup/memory.max",
    )


def test_the_cpu_request_is_read_from_the_pods_server_container():
    assert cpu_request(make_pod("demo-0", cpu=2)) == 2
    assert cpu_request(make_pod("demo-0", cpu="500m")) == pytest.approx(0.5)
    assert cpu_request({"spec": {"containers": [{"name": "sidecar"}]}}) is None


def test_a_static_cpu_manager_allocation_with_pinned_workers_is_exclusive():
    pod = make_pod("demo-0", workers=2, cpu=2)
    readings = {("demo-0", 0): report({2}, {2, 3}), ("demo-0", 1): report({3}, {2, 3})}
    assert pod_verdict(pod, [0, 1], readings).kind == "Exclusive"
    status, reason, message = pinned_condition(True, [pod], {"demo-0": [0, 1]}, readings)
    assert (status, reason) == ("True", "Exclusive")
    assert message == "each of the 1 appliance(s) runs on CPUs of its own"


@pytest.mark.parametrize(
    ("cpu", "reports", "why"),
    [
        # A kubelet without the static policy: the container may use every CPU of the node.
        (1, [report({0}, ONLINE)], "demo-0 may run on every CPU of node-1 (0-7)"),
        # A cpuset narrower than the node's (a nested node, say) but not the pod's own.
        (1, [report({4}, {4, 5, 6, 7})], "demo-0 may run on CPUs 4-7 of node-1, not on 1 CPU(s)"),
        # Exclusive CPUs, but the server was not pinned (no --pin).
        (2, [report({2, 3}, {2, 3})], "demo-0 worker 0 is bound to CPUs 2-3, not to one"),
    ],
    ids=["shared-pool", "not-its-own", "not-pinned"],
)
def test_appliances_without_cpus_of_their_own_are_named(cpu, reports, why):
    pods = [make_pod("demo-0", cpu=cpu, node="node-1"), make_pod("demo-1", node="node-2")]
    readings = {("demo-0", 0): reports[0], ("demo-1", 0): report({5}, {5})}
    status, reason, message = pinned_condition(True, pods, {"demo-0": [0], "demo-1": [0]}, readings)
    assert (status, reason) == ("False", "NotExclusive")
    assert message.startswith("1 of 2 appliance(s) without CPUs of their own (demo-0): ")
    assert why in message
    assert "cpuManagerPolicy: static" in message


def test_two_workers_on_one_cpu_are_not_pinned_apart():
    pod = make_pod("demo-0", workers=2, cpu=2)
    readings = {("demo-0", 0): report({2}, {2, 3}), ("demo-0", 1): report({2}, {2, 3})}
    verdict = pod_verdict(pod, [0, 1], readings)
    assert (verdict.kind, verdict.why) == ("NotExclusive", "demo-0 workers 0 and 1 share CPU 2")


def test_a_machine_that_does_not_say_its_cpus_is_judged_by_the_request():
    pod = make_pod("demo-0", cpu=1)
    assert pod_verdict(pod, [0], {("demo-0", 0): report({3}, {3}, online=None)}).kind == (
        "Exclusive"
    )


def test_until_every_appliance_has_answered_the_condition_is_unknown():
    pods = [make_pod("demo-0"), make_pod("demo-1")]
    workers = {"demo-0": [0], "demo-1": [0]}
    readings = {
        ("demo-0", 0): report({1}, {1}),
        ("demo-1", 0): "cannot read 10.0.0.1:11211: timed out",
    }
    status, reason, message = pinned_condition(True, pods, workers, readings)
    assert (status, reason) == ("Unknown", "NotReported")
    assert message == (
        "1 of 2 appliance(s) have not reported their CPUs: "
        "demo-1: cannot read 10.0.0.1:11211: timed out"
    )
    # A proven shared CPU is news at once, whatever the others have not said yet.
    readings[("demo-0", 0)] = report({0}, ONLINE)
    assert pinned_condition(True, pods, workers, readings)[:2] == ("False", "NotExclusive")


def test_without_pinning_or_ready_appliances_there_is_nothing_to_judge():
    assert pinned_condition(False, [], {}, {})[:2] == ("False", "PinningOff")
    assert pinned_condition(True, [make_pod("demo-0")], {}, {})[:2] == ("Unknown", "NoAppliances")
