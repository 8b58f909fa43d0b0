"""Auto discovery on the operator's side: who is a member, in which order, and when the
version moves (only when the list a client sees changes). Passes are simulated the way
reconcile.py runs them: the membership published before comes back from the status."""

from __future__ import annotations

from cacheoperator.children import configmap
from cacheoperator.discovery import (
    discovery_endpoint,
    members,
    membership_file,
    next_discovery,
    previous_discovery,
)
from cacheoperator.status import Observed, compute_status, invalid_status
from cacheserver.discovery.membership import config_data, parse_membership
from operator_testkit import REF, make_pod, make_statefulset, spec_of

T0, T1, T2 = "2030-01-01T00:00:00Z", "2030-01-01T00:01:00Z", "2030-01-01T00:02:00Z"


def publish(spec, pods, status=None, now=T0) -> dict:
    """One pass's discovery, as the status dict it leaves (the next pass's memory)."""
    published = previous_discovery(status)
    nodes = members(REF, spec, pods, published.nodes if published else ())
    discovery = next_discovery(published, nodes, discovery_endpoint(REF, spec), now)
    return {"discovery": discovery.model_dump(by_alias=True, exclude_none=True)}


def listed(status) -> list[str]:
    return [f"{n['host']}|{n['address']}|{n['port']}" for n in status["discovery"]["nodes"]]


def version(status) -> int:
    return status["discovery"]["version"]


def pods_on(count: int, **kw) -> list[dict]:
    """demo-0 ... on node-0 ... at 10.0.0.0 ..., ready unless told otherwise."""
    return [
        make_pod(f"demo-{i}", node=f"node-{i}", host_ip=f"10.0.0.{i}", **kw) for i in range(count)
    ]


def test_partition_ordinal_worker_order_with_stable_names():
    spec = spec_of(
        replicas=4,
        workers=2,
        resources={"cpu": 2},
        placement={"strategy": "partition", "partitions": 2},
    )
    pods = [
        make_pod(f"demo-p{p}-{i}", node=f"n{p}{i}", host_ip=f"10.0.{p}.{i}", partition=p, workers=2)
        for p in (2, 1)
        for i in (1, 0)
    ]  # the API server's order is no order
    status = publish(spec, pods)
    assert listed(status) == [
        f"demo-p{p}-{i}.demo-headless.cache.svc|10.0.{p}.{i}|{port}"
        for p in (1, 2)
        for i in (0, 1)
        for port in (11211, 11212)
    ]
    assert status["discovery"]["endpoint"] == "demo-discovery.cache.svc:11211"
    assert version(status) == 1 and status["discovery"]["lastChangeTime"] == T0
    # Ordinals compare as numbers: demo-10 comes after demo-9.
    eleven = publish(spec_of(replicas=11), pods_on(11))
    assert [h.split(".")[0] for h in listed(eleven)][-3:] == ["demo-8", "demo-9", "demo-10"]


def test_a_new_cluster_starts_empty_at_version_0_then_counts_up():
    spec = spec_of(replicas=3)
    status = publish(spec, [])
    assert version(status) == 0 and listed(status) == []
    assert version(publish(spec, [], status, now=T1)) == 0  # still nothing: no change
    unplaced = [make_pod(f"demo-{i}", ready=False, unschedulable="0/3 nodes") for i in range(3)]
    assert version(publish(spec, unplaced, status, now=T1)) == 0  # no address, no member
    status = publish(spec, pods_on(2, ready=False), status, now=T1)
    assert version(status) == 1 and len(listed(status)) == 2  # placed, not ready yet: members
    status = publish(spec, pods_on(3), status, now=T2)
    assert version(status) == 2 and len(listed(status)) == 3


def test_no_change_is_no_bump_whatever_the_readiness():
    spec = spec_of(replicas=3)
    status = publish(spec, pods_on(3))
    for again in (pods_on(3), pods_on(3, ready=False), pods_on(3, restarted=137, ready=False)):
        after = publish(spec, again, status, now=T1)
        assert after == status  # same version, same change time: nothing to patch


def test_scaling_3_to_5_to_2_bumps_once_per_change_of_the_list():
    status = publish(spec_of(replicas=3), pods_on(3))
    assert version(status) == 1
    # Scaled to 5: the two new pods become members as they get addresses.
    placing = [*pods_on(3), make_pod("demo-3", ready=False, node=None)]
    status = publish(spec_of(replicas=5), placing, status, now=T1)
    assert version(status) == 1
    status = publish(spec_of(replicas=5), pods_on(5), status, now=T1)
    assert version(status) == 2 and len(listed(status)) == 5
    # Scaled to 2: gone from the list at once, before their pods are (they are leaving).
    status = publish(spec_of(replicas=2), pods_on(5), status, now=T2)
    assert version(status) == 3
    assert listed(status) == [f"demo-{i}.demo-headless.cache.svc|10.0.0.{i}|11211" for i in (0, 1)]
    assert status["discovery"]["lastChangeTime"] == T2
    assert version(publish(spec_of(replicas=2), pods_on(2), status, now=T2)) == 3


def test_a_restarted_or_recreated_pod_keeps_its_place_and_the_version():
    spec = spec_of(replicas=3)
    status = publish(spec, pods_on(3))
    before = listed(status)
    deleted = [p for p in pods_on(3) if p["metadata"]["name"] != "demo-1"]
    recreated = [*deleted, make_pod("demo-1", node=None, ready=False)]  # not placed yet
    back = pods_on(3, ready=False)  # the same node again (hostNetwork: same address)
    for world in (pods_on(3, deleting=True), deleted, recreated, back, pods_on(3)):
        status = publish(spec, world, status, now=T1)
        assert listed(status) == before and version(status) == 1


def test_a_pod_that_comes_back_on_another_node_bumps_the_version():
    spec = spec_of(replicas=3)
    status = publish(spec, pods_on(3))
    moved = pods_on(3)
    moved[1] = make_pod("demo-1", node="node-9", host_ip="10.0.0.9")
    status = publish(spec, moved, status, now=T1)
    assert version(status) == 2
    assert listed(status)[1] == "demo-1.demo-headless.cache.svc|10.0.0.9|11211"
    # A port change rolls the pods: each one back on its new port is a change.
    status = publish(spec_of(replicas=3, port=12000), pods_on(3, port=12000), status, now=T2)
    assert version(status) == 3


def test_the_version_survives_an_operator_restart_through_the_status():
    spec = spec_of(replicas=3)
    status = publish(spec, pods_on(3))
    status = publish(spec, pods_on(2), status, now=T1)  # demo-2 deleted: keeps its place
    written = compute_status(
        cluster="demo",
        generation=1,
        spec=spec,
        observed=Observed(statefulsets=[make_statefulset("demo", 3)], pods=pods_on(3)),
        previous=None,
        now=T1,
        discovery=previous_discovery(status),
    )
    assert written["discovery"] == status["discovery"]
    # A new operator process knows nothing but the status it reads back.
    assert publish(spec, pods_on(3), {"discovery": written["discovery"]}, now=T2) == status
    assert previous_discovery({"discovery": {"version": "x"}}) is None


def test_an_invalid_spec_leaves_the_published_membership_alone():
    status = publish(spec_of(replicas=2), pods_on(2))
    invalid = invalid_status(
        cluster="demo",
        generation=2,
        problems=["spec.replicas: bad"],
        observed=Observed(pods=pods_on(2)),
        previous=status,
        now=T1,
        discovery=previous_discovery(status),
    )
    assert invalid["discovery"] == status["discovery"]


def test_the_file_the_appliances_serve_is_read_by_the_server():
    """The contract between operator and server: the ConfigMap key, parsed by
    cacheserver.discovery, gives ElastiCache's data block in the operator's order."""
    spec = spec_of(replicas=2, workers=2, resources={"cpu": 2})
    status = publish(spec, pods_on(2, workers=2), now=T1)
    data = configmap(REF, spec, [], previous_discovery(status))["data"]
    served = parse_membership(data["cluster.json"].encode())
    assert served.version == 1 and served.changed == 1893456060.0
    assert config_data(served) == (
        b"1\n"
        b"demo-0.demo-headless.cache.svc|10.0.0.0|11211 "
        b"demo-0.demo-headless.cache.svc|10.0.0.0|11212 "
        b"demo-1.demo-headless.cache.svc|10.0.0.1|11211 "
        b"demo-1.demo-headless.cache.svc|10.0.0.1|11212\n"
    )
    assert parse_membership(membership_file(None).encode()).nodes == ()
