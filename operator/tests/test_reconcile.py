"""The parts of a reconcile pass that need no API server: coalescing and ownership.
(Passes against a real API server are the end-to-end suite's.)"""

from __future__ import annotations

import threading

import pytest

from cacheoperator.kube import KubeError
from cacheoperator.reconcile import ON_A_NODE, ClusterController, Coalescer, owned_by
from operator_testkit import UID, make_pod, make_statefulset


def test_calls_during_a_pass_fold_into_one_more_pass():
    coalescer = Coalescer()
    started, release = threading.Event(), threading.Event()
    passes = []

    def slow_pass():
        passes.append("pass")
        if len(passes) == 1:
            started.set()
            assert release.wait(5)

    first = threading.Thread(target=coalescer.run, args=("demo", slow_pass))
    first.start()
    assert started.wait(5)
    # Three events arrive while the first pass runs: none runs now, one runs after it.
    assert [coalescer.run("demo", slow_pass) for _ in range(3)] == [False, False, False]
    release.set()
    first.join(5)
    assert passes == ["pass", "pass"]
    assert coalescer.run("demo", slow_pass) is True  # idle again: runs at once
    assert len(passes) == 3


def test_other_keys_are_not_held_up():
    coalescer = Coalescer()
    inner = []
    coalescer.run("a", lambda: inner.append(coalescer.run("b", lambda: None)))
    assert inner == [True]


def test_a_failed_pass_does_not_wedge_its_key():
    coalescer = Coalescer()

    def boom():
        raise RuntimeError("API down")

    with pytest.raises(RuntimeError):
        coalescer.run("demo", boom)
    assert coalescer.run("demo", lambda: None) is True


def test_only_objects_this_cluster_controls_are_its_own():
    assert owned_by(make_statefulset("demo", 1), UID)
    assert not owned_by(make_statefulset("demo", 1), "another-uid")
    foreign = make_statefulset("demo", 1)
    foreign["metadata"]["ownerReferences"][0]["controller"] = False
    assert not owned_by(foreign, UID)
    assert not owned_by({"metadata": {}}, UID)


class PodLister:
    """Answers the pod lists of `ClusterController.host_port_pods` like an API server that
    forbids listing across namespaces when `namespaced`; counts the calls."""

    def __init__(self, pods, namespaced: bool):
        self.pods, self.namespaced, self.calls = pods, namespaced, []

    def list(self, resource, namespace, label_selector="", field_selector=""):
        self.calls.append((resource.plural, namespace, field_selector))
        if namespace is None and self.namespaced:
            raise KubeError(
                403, 'pods is forbidden: cannot list resource "pods" at the cluster scope'
            )
        return [p for p in self.pods if namespace in (None, p["metadata"]["namespace"])]


@pytest.mark.parametrize("namespaced", [False, True])
def test_host_port_pods_come_from_every_namespace_the_operator_may_list(namespaced):
    pods = [
        make_pod("a-0", cluster="a", node="node-1"),
        make_pod("web", cluster=None, namespace="web", node="node-1"),
        make_pod("podnet", cluster="p", node="node-1", host_network=False),  # no host port
    ]
    lister = PodLister(pods, namespaced)
    controller = ClusterController(lister, "img")
    found, note = controller.host_port_pods("cache")
    names = sorted(p["metadata"]["name"] for p in found)
    if namespaced:
        assert (names, note) == (["a-0"], "the operator may list pods in namespace cache only")
    else:
        assert (names, note) == (["a-0", "web"], "")
    assert lister.calls[0] == ("pods", None, ON_A_NODE)
    calls = len(lister.calls)
    assert controller.host_port_pods("cache") == (found, note)  # a second pass reads nothing
    assert len(lister.calls) == calls
