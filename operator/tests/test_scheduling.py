"""Reading the scheduler: its reasons, the host ports pods declare, the nodes a pod may
use, and who holds a port on them. Messages are kube-scheduler's own wording."""

from __future__ import annotations

from cacheoperator.scheduling import (
    HostPort,
    describe_holders,
    host_ports,
    node_fits,
    port_holders,
    says_ports_taken,
    scheduler_reasons,
)
from operator_testkit import make_pod

ZONE = "topology.kubernetes.io/zone"
PORTS = "node(s) didn't have free ports for the requested pod ports"


def test_reasons_come_with_their_node_counts_most_first_without_the_preemption_part():
    message = (
        f"0/8 nodes are available: 1 node(s) had untolerated taint "
        f"{{node.kubernetes.io/unreachable: }}, 2 node(s) didn't match Pod's node "
        f"affinity/selector, 5 {PORTS}. preemption: 0/8 nodes are available: "
        f"8 Preemption is not helpful for scheduling."
    )
    assert scheduler_reasons(message) == [
        (5, PORTS),
        (2, "node(s) didn't match Pod's node affinity/selector"),
        (1, "node(s) had untolerated taint {node.kubernetes.io/unreachable: }"),
    ]
    assert says_ports_taken(message)
    # kube-scheduler 1.36, as it wrote it on a pod of a cluster whose port another held.
    message = (
        f"0/3 nodes are available: 1 node(s) didn't match Pod's node affinity/selector, "
        f"2 {PORTS}. no new claims to deallocate, preemption: 0/3 nodes are available: "
        "1 Preemption is not helpful for scheduling, 2 No preemption victims found for "
        "incoming pod."
    )
    assert scheduler_reasons(message) == [
        (2, PORTS),
        (1, "node(s) didn't match Pod's node affinity/selector"),
    ]
    assert scheduler_reasons("0/3 nodes are available: 3 Insufficient cpu.") == [
        (3, "Insufficient cpu")
    ]
    assert scheduler_reasons("no nodes available to schedule pods") == []


def test_host_ports_are_what_the_pod_declares():
    pod = make_pod("demo-0", workers=2, udp_port=11211)
    assert host_ports(pod) == {
        HostPort(11211, "TCP"),
        HostPort(11212, "TCP"),
        HostPort(11211, "UDP"),
        HostPort(11212, "UDP"),
        HostPort(21211, "TCP"),
    }
    # On the pod network only an explicit hostPort takes a port of the node.
    assert host_ports(make_pod("demo-0", host_network=False)) == frozenset()


def test_a_pod_fits_a_node_by_its_selector_and_required_affinity():
    pod = make_pod("demo-0", requires_labels=(ZONE,), node_selector={"pool": "cache"})
    assert node_fits(pod, {ZONE: "a", "pool": "cache"})
    assert not node_fits(pod, {ZONE: "a"})  # selector
    assert not node_fits(pod, {"pool": "cache"})  # affinity
    assert node_fits(pod, None)  # unknown labels cannot rule a node out
    assert node_fits(make_pod("demo-0"), {})


def test_holders_are_the_pods_with_the_port_on_nodes_the_stuck_pod_may_use():
    stuck = make_pod(
        "c-0", cluster="c", unschedulable=f"0/3 nodes are available: 3 {PORTS}.",
        requires_labels=(ZONE,),
    )  # fmt: skip
    pods = [
        make_pod("a-0", cluster="a", node="node-1"),  # same port, a node c may use
        make_pod("a-1", cluster="a", node="node-9"),  # same port, a node without a zone
        make_pod("b-0", cluster="b", node="node-2", port=11311),  # another port
        make_pod("c-1", cluster="c", node="node-3"),  # c's own
        make_pod("web", cluster=None, namespace="web", node="node-2", host_network=True),
        make_pod("x-0", cluster="x", node=None, unschedulable="stuck too"),  # holds nothing
    ]
    labels = {"node-1": {ZONE: "a"}, "node-2": {ZONE: "b"}, "node-3": {ZONE: "a"}, "node-9": {}}
    holders = port_holders(stuck, pods, labels, cluster="c")
    assert [(h.holder, str(h.port), h.node, h.own) for h in holders] == [
        ("CacheCluster cache/a", "11211/TCP", "node-1", False),
        ("CacheCluster cache/a", "21211/TCP", "node-1", False),
        ("CacheCluster cache/c", "11211/TCP", "node-3", True),
        ("CacheCluster cache/c", "21211/TCP", "node-3", True),
        ("pod web/web", "11211/TCP", "node-2", False),
        ("pod web/web", "21211/TCP", "node-2", False),
    ]
    assert describe_holders([h for h in holders if not h.own]) == (
        "11211/TCP and 21211/TCP held by CacheCluster cache/a on node-1; "
        "11211/TCP and 21211/TCP held by pod web/web on node-2"
    )


def test_the_same_cluster_name_in_another_namespace_is_not_the_own_cluster():
    stuck = make_pod("c-0", cluster="c", unschedulable=PORTS)
    twin = make_pod("c-0", cluster="c", namespace="other", node="node-1")
    holders = port_holders(stuck, [twin], {}, "c")
    assert {(h.holder, h.own) for h in holders} == {("CacheCluster other/c", False)}
