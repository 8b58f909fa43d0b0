"""The parts of a reconcile pass that need no API server: the work queue and the threads
that run passes, what is applied again, and ownership. (Passes against a real API server are
the end-to-end suite's; `make bench-operator` runs 300 clusters.)"""

from __future__ import annotations

import contextvars
import threading
import time

import pytest

from cacheoperator import reconcile
from cacheoperator.children import desired_objects
from cacheoperator.kube import KubeError
from cacheoperator.reconcile import (
    ON_A_NODE,
    AppliedObjects,
    ClusterController,
    WorkQueue,
    owned_by,
)
from operator_testkit import REF, UID, make_pod, make_statefulset, spec_of


def test_events_for_a_waiting_cluster_fold_into_its_one_pass():
    queue = WorkQueue()
    for _ in range(3):
        queue.add("demo")
    assert queue.get(timeout=1) == "demo"
    assert queue.get(timeout=0.05) is None  # not three passes
    queue.done("demo")
    assert queue.get(timeout=0.05) is None


def test_an_event_during_a_pass_makes_one_more_pass_after_it_never_beside_it():
    queue = WorkQueue()
    queue.add("demo")
    assert queue.get(timeout=1) == "demo"
    queue.add("demo")
    queue.add("demo")
    assert queue.get(timeout=0.05) is None  # no second pass of it while the first runs
    queue.done("demo")
    assert queue.get(timeout=1) == "demo"
    queue.done("demo")
    assert queue.get(timeout=0.05) is None


def test_other_clusters_are_not_held_up_by_a_running_pass():
    queue = WorkQueue()
    queue.add("a")
    assert queue.get(timeout=1) == "a"
    queue.add("b")
    assert queue.get(timeout=1) == "b"


def _pass_over(queue, key):
    assert queue.get(timeout=1) == key
    queue.done(key)


def test_running_clusters_are_not_held_up_behind_a_burst_of_new_ones():
    queue = WorkQueue()
    for key in ("a", "b"):
        queue.add(key)
        _pass_over(queue, key)
    for i in range(5):
        queue.add(f"new-{i}")  # five clusters created at once (or an operator start)
    queue.add("a")  # a pod of a running cluster changed
    queue.add("b")
    order = [queue.get(timeout=1) for _ in range(7)]
    # The lanes take turns: neither waits for the other to empty.
    assert order == ["a", "new-0", "b", "new-1", "new-2", "new-3", "new-4"]


def test_new_clusters_get_every_other_pass_however_busy_the_running_ones_are():
    queue = WorkQueue()
    busy = [f"busy-{i}" for i in range(3)]
    for key in busy:
        queue.add(key)
        _pass_over(queue, key)
    queue.add("new")
    taken = []
    for _ in range(4):
        for key in busy:
            queue.add(key)  # their pods never stop changing
        key = queue.get(timeout=1)
        taken.append(key)
        queue.done(key)
    assert "new" in taken[:2]


def test_a_deleted_cluster_made_again_is_a_new_one():
    queue = WorkQueue()
    queue.add("a")
    _pass_over(queue, "a")
    queue.forget("a")
    queue.add("n")
    queue.add("a")
    assert [queue.get(timeout=1), queue.get(timeout=1)] == ["n", "a"]  # both new: in order


def test_a_retry_waits_its_delay_and_wakes_a_waiting_thread():
    queue = WorkQueue()
    got = []
    taker = threading.Thread(target=lambda: got.append(queue.get(timeout=5)))
    taker.start()
    started = time.monotonic()
    queue.add("demo", delay=0.2)
    taker.join(5)
    assert got == ["demo"]
    assert 0.2 <= time.monotonic() - started < 2


class Answers:
    """An API server that answers each GET of the cluster with the next of `answers` (an
    error to raise, or None: the cluster is gone), and notes the context each came in."""

    def __init__(self, *answers):
        self.answers = list(answers)
        self.calls = []
        self.answered = threading.Event()

    def get(self, resource, namespace, name):
        self.calls.append((namespace, name, threading.current_thread().name, TENANT.get(None)))
        answer = self.answers.pop(0) if self.answers else None
        if not self.answers:
            self.answered.set()
        if isinstance(answer, Exception):
            raise answer
        return answer


TENANT: contextvars.ContextVar[str] = contextvars.ContextVar("tenant")


def test_passes_run_on_the_controllers_threads_in_the_first_callers_context(monkeypatch):
    monkeypatch.setattr(reconcile, "RETRY_DELAY", 0.05)
    kube = Answers(KubeError(503, "etcd leader changed"), None)
    controller = ClusterController(kube, "img", workers=2)
    TENANT.set("kopf's")  # kopf.event finds its event queue in the handler's context
    controller.reconcile("cache", "demo")  # returns at once
    assert kube.answered.wait(5)
    # The passing failure was tried again, on a thread of the controller's, in that context.
    assert [(ns, name, ctx) for ns, name, _, ctx in kube.calls] == [
        ("cache", "demo", "kopf's"),
        ("cache", "demo", "kopf's"),
    ]
    assert all(thread.startswith("reconcile-") for _, _, thread, _ in kube.calls)


def test_a_refusal_that_retrying_cannot_fix_is_not_retried(monkeypatch):
    monkeypatch.setattr(reconcile, "RETRY_DELAY", 0.05)
    kube = Answers(KubeError(403, "cacheclusters is forbidden"))
    controller = ClusterController(kube, "img", workers=1)
    controller.reconcile("cache", "demo")
    assert kube.answered.wait(5)
    time.sleep(0.3)
    assert len(kube.calls) == 1


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _answer(obj, uid="uid-1", generation=1):
    return {**obj, "metadata": {**obj["metadata"], "uid": uid, "generation": generation}}


def test_an_object_is_sent_again_when_it_changes_or_its_last_apply_is_old():
    clock = Clock()
    applied = AppliedObjects(refresh=300, clock=clock)
    service = next(o for o in desired_objects(REF, spec_of(), "img") if o["kind"] == "Service")
    assert applied.needed(REF, service)  # never sent
    applied.record(REF, service, _answer(service))
    assert not applied.needed(REF, service)
    moved = {**service, "spec": {**service["spec"], "selector": {"other": "pods"}}}
    assert applied.needed(REF, moved)
    clock.now += 301  # someone may have edited or deleted it meanwhile: not watched
    assert applied.needed(REF, service)
    applied.record(REF, service, _answer(service))
    applied.forget(REF.namespace, REF.name)  # the cluster was deleted
    assert applied.needed(REF, service)


def test_a_watched_statefulset_is_sent_again_once_someone_else_changed_or_removed_it():
    applied = AppliedObjects(clock=Clock())
    (sts,) = [o for o in desired_objects(REF, spec_of(), "img") if o["kind"] == "StatefulSet"]
    applied.record(REF, sts, _answer(sts, "uid-1", 2))
    assert not applied.needed(REF, sts, _answer(sts, "uid-1", 2), watched=True)
    assert applied.needed(REF, sts, _answer(sts, "uid-1", 3), watched=True)  # spec edited
    assert applied.needed(REF, sts, _answer(sts, "uid-2", 2), watched=True)  # re-created
    assert applied.needed(REF, sts, None, watched=True)  # deleted


class Recorder:
    """An API server that takes every apply (uid and generation 1) and counts them."""

    def __init__(self):
        self.applied = []

    def apply(self, obj):
        self.applied.append((obj["kind"], obj["metadata"]["name"]))
        return _answer(obj)

    def list(self, resource, namespace, selector=None, field_selector=None):
        return []  # (no pods yet: the StatefulSet just applied is not settled)


def test_a_second_pass_over_the_same_spec_applies_nothing():
    kube = Recorder()
    controller = ClusterController(kube, "img")
    listed = []
    controller.apply_children(REF, spec_of(), listed)
    assert sorted(kube.applied) == [
        ("PodDisruptionBudget", "demo"),
        ("Service", "demo"),
        ("Service", "demo-discovery"),
        ("Service", "demo-headless"),
        ("StatefulSet", "demo"),
    ]
    # The answer stands in for the StatefulSet as listed, so the pass observes it.
    assert [(s["metadata"]["name"], s["metadata"]["uid"]) for s in listed] == [("demo", "uid-1")]
    kube.applied.clear()
    controller.apply_children(REF, spec_of(), listed)
    assert kube.applied == []
    controller.apply_children(REF, spec_of(replicas=5), listed)
    assert kube.applied == [("StatefulSet", "demo")]


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
