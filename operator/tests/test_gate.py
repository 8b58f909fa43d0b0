"""Back to its node (gate.py): which node the status remembers for each appliance, and how
the operator releases a new pod held by the placement gate, preferring that node, and never
leaves one gated for an error. (The scheduler's side is the end-to-end suite's.)"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import kopf
import pytest

from cacheoperator import handlers, reconcile
from cacheoperator.appliances import ApplianceReport, Restore
from cacheoperator.children import desired_objects
from cacheoperator.gate import (
    GATE,
    NO_NODE,
    SNAPSHOT_NODE,
    home_node,
    is_gated,
    node_term,
    release_patch,
)
from cacheoperator.kube import KubeError
from cacheoperator.reconcile import ClusterController
from cacheoperator.status import Observed, compute_status, invalid_status, move_events
from cacheserver import warmdir
from operator_testkit import REF, make_pod, of_kind, spec_of

NOW = "2030-01-01T00:00:00Z"
REQUIRED = ("topology.kubernetes.io/zone",)


def pod(name: str, uid: str, node: str | None = None, *, gates=(GATE,), **kw) -> dict[str, Any]:
    """A pod of the cluster "demo": placed and ready on `node`, or new and held by `gates`."""
    out = make_pod(name, node=node, ready=node is not None, requires_labels=REQUIRED, **kw)
    out["metadata"]["uid"] = uid
    if node is None and gates:
        out["spec"]["schedulingGates"] = [{"name": g} for g in gates]
    return out


def status(pods, previous=None, replicas=None, reports=None, **spec) -> dict[str, Any]:
    """The status a pass writes (as stored: camelCase dicts). `reports`: pod -> Restore."""
    readings = {
        (p, 0): ApplianceReport(frozenset({1}), frozenset({1}), None, restore=r)
        for p, r in (reports or {}).items()
    }
    return compute_status(
        cluster="demo",
        generation=1,
        spec=spec_of(replicas=len(pods) if replicas is None else replicas, **spec),
        observed=Observed(pods=pods, readings=readings),
        previous=previous,
        now=NOW,
    )


def last(st: dict[str, Any]) -> dict[str, tuple]:
    return {e["pod"]: (e["node"], e.get("uid"), e.get("previousNode")) for e in st["lastNodes"]}


# ---- what the status remembers ----------------------------------------------------------


def test_the_status_remembers_each_appliances_node_while_its_pod_is_replaced():
    first = status([pod("demo-0", "a", "n1"), pod("demo-1", "b", "n2")])
    assert last(first) == {"demo-0": ("n1", "a", None), "demo-1": ("n2", "b", None)}
    # demo-1 is replaced (a rollout): the new pod waits at the gate, not placed, not ready.
    waiting = status([pod("demo-0", "a", "n1"), pod("demo-1", "c")], first)
    assert last(waiting) == last(first)
    assert home_node(waiting, "demo-1") == "n2" and home_node(waiting, "demo-2") is None
    # It came back to n2: a new start there, no move.
    back = status([pod("demo-0", "a", "n1"), pod("demo-1", "c", "n2")], waiting)
    assert last(back)["demo-1"] == ("n2", "c", None)
    assert move_events(waiting, back) == []
    # Replaced again, and this time it started on n3 (n2 drained): the status says so once.
    moved = status([pod("demo-0", "a", "n1"), pod("demo-1", "d", "n3")], back)
    assert last(moved)["demo-1"] == ("n3", "d", "n2")
    (event,) = move_events(back, moved)
    assert (event.type, event.reason) == ("Warning", "Moved")
    assert event.message.startswith("demo-1 runs on n3 now, not on n2 where it ran before")
    assert (
        move_events(moved, status([pod("demo-0", "a", "n1"), pod("demo-1", "d", "n3")], moved))
        == []
    )
    # Scaled down to one: demo-1's node is forgotten, demo-0's kept.
    assert last(status([pod("demo-0", "a", "n1")], moved, replicas=1)) == {
        "demo-0": ("n1", "a", None)
    }


def test_a_pod_that_started_elsewhere_says_so_in_its_appliance_entry():
    before = status([pod("demo-0", "a", "n1")], reports={"demo-0": Restore("restored", 5)})
    assert "previousNode" not in before["appliances"][0]
    after = status([pod("demo-0", "b", "n4")], before, reports={"demo-0": Restore("none")})
    (entry,) = after["appliances"]
    assert (entry["node"], entry["warmRestart"], entry["previousNode"]) == ("n4", "none", "n1")


def test_without_warm_restart_no_node_is_remembered():
    st = status([pod("demo-0", "a", "n1")], warmRestart={"enabled": False})
    assert st["lastNodes"] == []


def test_an_invalid_spec_keeps_the_nodes_as_they_were():
    remembered = status([pod("demo-0", "a", "n1")])
    st = invalid_status(
        cluster="demo",
        generation=2,
        problems=["spec.port: bad"],
        observed=Observed(pods=[pod("demo-0", "b")]),
        previous=remembered,
        now=NOW,
    )
    assert st["lastNodes"] == remembered["lastNodes"]


# ---- the patch ----------------------------------------------------------------------------


def test_the_release_removes_our_gate_and_prefers_the_node_by_name():
    gated = pod("demo-1", "c", gates=("example.com/other", GATE))
    patch = release_patch(gated, "n2")
    # Gates merge by name: the patch deletes ours alone, whatever else the pod waits for.
    assert patch["spec"]["schedulingGates"] == [{"$patch": "delete", "name": GATE}]
    # Only what the API server lets a gated pod change: the preferred node-affinity terms,
    # not the required ones (they may only narrow) nor the nodeSelector.
    assert patch["spec"]["affinity"] == {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "preference": {
                        "matchFields": [
                            {"key": "metadata.name", "operator": "In", "values": ["n2"]}
                        ]
                    },
                }
            ]
        }
    }
    assert set(patch) == {"spec"} and set(patch["spec"]) == {"schedulingGates", "affinity"}
    assert release_patch(gated, None) == {
        "spec": {"schedulingGates": [{"$patch": "delete", "name": GATE}]}
    }


def test_the_release_tells_the_pod_where_its_latest_snapshot_is():
    """The init container reads the annotation (downward API) and keeps only a snapshot on
    that node (cacheserver.warmdir.not_latest)."""
    gated = pod("demo-1", "c")
    assert release_patch(gated, "n2", "n2")["metadata"] == {"annotations": {SNAPSHOT_NODE: "n2"}}
    assert release_patch(gated, None, NO_NODE)["metadata"] == {
        "annotations": {SNAPSHOT_NODE: NO_NODE}
    }
    # The pod reads it from its init container's environment, under the same key.
    (sts,) = of_kind(desired_objects(REF, spec_of(), "img"), "StatefulSet")
    (init,) = sts["spec"]["template"]["spec"]["initContainers"]
    paths = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in init["env"]}
    assert paths["SNAPSHOT_NODE"] == f"metadata.annotations['{SNAPSHOT_NODE}']"
    assert paths["NODE_NAME"] == "spec.nodeName"
    assert init["args"][-4:] == ["--node", "$(NODE_NAME)", "--last-node", "$(SNAPSHOT_NODE)"]
    assert NO_NODE == warmdir.NO_NODE  # one word on both sides


def test_the_pods_own_preferences_are_kept_and_ours_is_added_once():
    gated = pod("demo-1", "c")
    theirs = {
        "weight": 5,
        "preference": {"matchExpressions": [{"key": "disk", "operator": "In", "values": ["ssd"]}]},
    }
    gated["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = [
        theirs
    ]
    preferred = release_patch(gated, "n2")["spec"]["affinity"]["nodeAffinity"][
        "preferredDuringSchedulingIgnoredDuringExecution"
    ]
    assert preferred == [theirs, node_term("n2")]
    # Released twice (its event, and a pass that listed it before): the same list again.
    gated["spec"]["affinity"]["nodeAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"] = (
        preferred
    )
    assert (
        release_patch(gated, "n2")["spec"]["affinity"]["nodeAffinity"][
            "preferredDuringSchedulingIgnoredDuringExecution"
        ]
        == preferred
    )


def test_only_pods_at_our_gate_wait_for_the_operator():
    assert is_gated(pod("demo-1", "c"))
    assert not is_gated(pod("demo-1", "c", gates=("example.com/other",)))
    assert not is_gated(pod("demo-1", "c", "n1"))
    assert not is_gated(pod("demo-1", "c", deleting=True))


# ---- releasing, against a stand-in for the API server ------------------------------------


class Api:
    """Answers the release's calls like an API server: the CacheCluster (or an error), and
    pod patches (or the errors queued in `patch_errors`, one per patch); records them."""

    def __init__(self, cluster=None, get_error=None, patch_errors=()):
        self.cluster, self.get_error, self.patch_errors = cluster, get_error, list(patch_errors)
        self.calls: list[tuple] = []
        self.got = threading.Event()

    def get(self, resource, namespace, name):
        self.calls.append(("get", resource.plural, name))
        self.got.set()
        if self.get_error:
            raise self.get_error
        return self.cluster

    def patch(self, resource, namespace, name, patch):
        self.calls.append(("patch", resource.plural, name, patch))
        if self.patch_errors and (error := self.patch_errors.pop(0)):
            raise error
        return {}


def cluster_with(st: dict[str, Any] | None) -> dict[str, Any]:
    return {"metadata": {"name": "demo", "namespace": "cache", "uid": "u"}, "status": st or {}}


def controller(api: Api) -> tuple[ClusterController, list]:
    posted: list = []
    return ClusterController(
        api, "img", post_event=lambda body, e: posted.append((body, e))
    ), posted


REMEMBERED = status([pod("demo-0", "a", "n1"), pod("demo-1", "b", "n2")])


def test_a_new_pod_is_released_toward_its_node_in_two_calls():
    api = Api(cluster_with(REMEMBERED))
    ctl, posted = controller(api)
    assert ctl.release(pod("demo-1", "c")) is True
    assert api.calls == [
        ("get", "cacheclusters", "demo"),
        ("patch", "pods", "demo-1", release_patch(pod("demo-1", "c"), "n2", "n2")),
    ]
    assert posted == []
    # A pass has the cluster at hand already: one call.
    api.calls.clear()
    assert ctl.release(pod("demo-0", "d"), cluster_with(REMEMBERED)) is True
    assert api.calls == [("patch", "pods", "demo-0", release_patch(pod("demo-0", "d"), "n1", "n1"))]


@pytest.mark.parametrize(
    ("cluster", "said"), [(cluster_with(REMEMBERED), NO_NODE), (None, None)], ids=["new", "gone"]
)
def test_a_pod_with_no_known_node_is_just_released(cluster, said):
    api = Api(cluster)
    ctl, posted = controller(api)
    assert ctl.release(pod("demo-2", "e")) is True
    patch = release_patch(pod("demo-2", "e"), None, said)
    assert api.calls[-1] == ("patch", "pods", "demo-2", patch)
    assert posted == []


def test_pods_that_do_not_wait_are_left_alone():
    api = Api(cluster_with(REMEMBERED))
    ctl, _ = controller(api)
    for other in (pod("demo-1", "b", "n2"), pod("demo-1", "c", gates=("example.com/x",))):
        assert ctl.release(other) is False
    assert api.calls == []


def test_an_unreadable_cluster_or_a_refused_preference_still_releases_the_pod():
    api = Api(get_error=KubeError(500, "etcd timeout"))
    ctl, posted = controller(api)
    assert ctl.release(pod("demo-1", "c")) is True
    # No preference, and no word on its snapshot: the operator does not know.
    assert api.calls[-1] == ("patch", "pods", "demo-1", release_patch(pod("demo-1", "c"), None))
    assert "metadata" not in api.calls[-1][3]
    ((body, event),) = posted
    assert body["metadata"]["name"] == "demo-1"  # on the pod: the cluster could not be read
    assert (event.type, event.reason) == ("Warning", "NodeNotPreferred")
    assert "cannot read CacheCluster demo: HTTP 500: etcd timeout" in event.message

    api = Api(cluster_with(REMEMBERED), patch_errors=[KubeError(422, "Forbidden: pod updates")])
    ctl, posted = controller(api)
    assert ctl.release(pod("demo-1", "c")) is True
    # The preference goes; what it says about the snapshot stays.
    assert [c[3] for c in api.calls if c[0] == "patch"] == [
        release_patch(pod("demo-1", "c"), "n2", "n2"),
        release_patch(pod("demo-1", "c"), None, "n2"),
    ]
    ((body, event),) = posted
    assert body["metadata"]["name"] == "demo" and event.reason == "NodeNotPreferred"
    assert "the preference for node n2 was refused: HTTP 422" in event.message


def test_a_gate_that_cannot_be_removed_is_said_once_and_tried_again(monkeypatch):
    monkeypatch.setattr(reconcile, "RELEASE_RETRY", 0.01)
    forbidden = KubeError(403, 'pods "demo-1" is forbidden: cannot patch resource "pods"')
    api = Api(cluster_with({}), patch_errors=[forbidden, forbidden])
    ctl, posted = controller(api)
    assert ctl.release(pod("demo-1", "c")) is False
    assert ctl.release(pod("demo-1", "c")) is False  # the next pass tries again...
    ((body, event),) = posted  # ... and says it once, on the cluster
    assert body["metadata"]["name"] == "demo"
    assert (event.type, event.reason) == ("Warning", "GateNotRemoved")
    assert event.message.startswith(
        f"demo-1 stays Pending: the operator cannot remove its scheduling gate {GATE}"
    )
    calls = len(api.calls)
    time.sleep(0.3)
    assert len(api.calls) == calls  # forbidden will not pass by itself: no pass follows

    # The API server out of service: a pass of the cluster follows by itself.
    api = Api(None, patch_errors=[KubeError(503, "unavailable")])  # (the pass: cluster gone)
    ctl, _ = controller(api)
    assert ctl.release(pod("demo-1", "c"), cluster_with({})) is False
    assert api.got.wait(5), "no pass after a failure that may pass"
    assert api.calls[-1] == ("get", "cacheclusters", "demo")


def test_a_pod_event_releases_the_pod_before_the_pass():
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    (handler,) = [h for h in registry._watching._handlers if h.selector.any_name == "pods"]
    done: list[tuple] = []

    class Controller:
        def release(self, body):
            done.append(("release", body["metadata"]["name"]))

        def reconcile(self, namespace, name):
            done.append(("pass", name))

    for kind, body in [(k, pod("demo-1", "c")) for k in (None, "ADDED", "MODIFIED", "DELETED")] + [
        ("MODIFIED", pod("demo-1", "c", "n1", gates=()))
    ]:
        asyncio.run(
            handler.fn(
                type=kind,
                body=body,
                namespace="cache",
                labels=body["metadata"]["labels"],
                memo=kopf.Memo(controller=Controller()),
                logger=logging.getLogger("test"),
            )
        )
    release, run = ("release", "demo-1"), ("pass", "demo")
    # At start-up (no type), added, modified: released first; deleted, or a pod no gate
    # holds: only the pass.
    assert done == [release, run, release, run, release, run, run, run]


def test_a_pod_is_patched_once_and_the_watched_cluster_spares_the_read():
    # The pod's own later events and a pass that listed it before the patch landed still
    # show it gated: one patch. The cluster as its watch last showed it is used, not read.
    api = Api(get_error=KubeError(500, "must not be read"))
    ctl, posted = controller(api)
    ctl.seen(cluster_with(REMEMBERED))
    gated = pod("demo-1", "c")
    assert ctl.release(gated) is True
    assert ctl.release(gated) is False
    ctl.release_gated([gated], cluster_with(REMEMBERED))
    assert api.calls == [("patch", "pods", "demo-1", release_patch(gated, "n2", "n2"))]
    assert posted == []
