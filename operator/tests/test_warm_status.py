"""What the operator reports about warm restarts: it asks each ready appliance once per
container start what it restored (a real server here), and the status and events say it."""

from __future__ import annotations

import signal
from pathlib import Path

from cacheoperator.appliance import UNKNOWN, Restore, read_restore
from cacheoperator.reconcile import READ_ATTEMPTS, ClusterController
from cacheoperator.status import Observed, compute_status, restore_events
from operator_testkit import REF, make_pod, spec_of
from servers import request, start_cacheserver

NOW = "2030-01-01T00:00:00Z"


def test_a_real_appliance_says_what_it_restored(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    server = start_cacheserver("-m", "16", "-e", str(path), udp=False)
    try:
        assert read_restore("127.0.0.1", [server.port]) == Restore("none", 0)
        for i in range(25):
            request(server, b"set k%d 0 0 1\r\nx\r\n" % i)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
    server = start_cacheserver("-m", "16", "-e", str(path), udp=False, port=server.port)
    try:
        assert read_restore("127.0.0.1", [server.port]) == Restore("restored", 25)
    finally:
        server.stop()
    # Nobody listening: unknown, quickly.
    assert read_restore("127.0.0.1", [server.port], timeout=0.5) is UNKNOWN


def test_workers_are_added_up_and_a_refusal_is_never_hidden() -> None:
    answers = {
        1: {"warm_restart": "restored", "warm_restart_restored_items": "10"},
        2: {"warm_restart": "refused", "warm_restart_reason": "corrupt"},
        3: {"warm_restart": "restored", "warm_restart_restored_items": "5"},
        4: {"curr_items": "0"},  # a server without -e
    }

    def stats(address: str, port: int, timeout: float):  # type: ignore[no-untyped-def]
        return answers[port]

    assert read_restore("h", [1, 3], stats=stats) == Restore("restored", 15)
    assert read_restore("h", [1, 2, 3], stats=stats) == Restore("refused", 15, "corrupt")
    assert read_restore("h", [1, 4], stats=stats) is UNKNOWN


def _pod(name: str, started: str, **kw):  # type: ignore[no-untyped-def]
    pod = make_pod(name, restarted=0, **kw)
    pod["metadata"]["uid"] = f"uid-{name}"
    pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"] = started
    return pod


def _status(pods, restores, previous=None):  # type: ignore[no-untyped-def]
    return compute_status(
        cluster="demo",
        generation=1,
        spec=spec_of(replicas=len(pods)),
        observed=Observed(pods=pods, restores=restores),
        previous=previous,
        now=NOW,
    )


def test_the_status_lists_each_start_and_each_new_start_makes_one_event() -> None:
    pods = [_pod("demo-0", "t1", node="n1"), _pod("demo-1", "t1", node="n2")]
    restores = {"demo-0": Restore("restored", 1200), "demo-1": Restore("refused", 0, "memory")}
    first = _status(pods, restores)
    assert first["appliances"] == [
        {
            "pod": "demo-0",
            "node": "n1",
            "startedAt": "t1",
            "warmRestart": "restored",
            "restoredItems": 1200,
        },
        {
            "pod": "demo-1",
            "node": "n2",
            "startedAt": "t1",
            "warmRestart": "refused",
            "reason": "memory",
        },
    ]
    events = restore_events(None, first)
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Normal", "Restored", "demo-0 restored 1200 items from its snapshot"),
        ("Warning", "SnapshotRefused", "demo-1 refused its snapshot (memory) and started empty"),
    ]
    assert restore_events(first, _status(pods, restores, first)) == []  # nothing new
    # demo-1 moved to another node and started there without a snapshot.
    moved = [pods[0], _pod("demo-1", "t2", node="n3")]
    second = _status(moved, {"demo-0": restores["demo-0"], "demo-1": Restore("none")}, first)
    (event,) = restore_events(first, second)
    assert event.reason == "StartedEmpty" and "demo-1 started empty on n3" in event.message


def test_each_container_start_is_asked_once_and_a_silent_one_a_few_times() -> None:
    controller = ClusterController(kube=None, default_image="x")  # type: ignore[arg-type]
    asked: list[tuple[str, list[int]]] = []
    answers = iter([UNKNOWN] * 10)

    def fake(address: str, ports: list[int], http_port: int | None = None) -> Restore:
        asked.append((address, ports))
        return Restore("restored", 7) if address == "10.0.0.1" else next(answers)

    controller.read_restore = fake  # type: ignore[method-assign]
    pods = [
        _pod("demo-0", "t1", host_ip="10.0.0.1", workers=2),
        _pod("demo-1", "t1", host_ip="10.0.0.2"),
        _pod("demo-2", "t1", host_ip="10.0.0.3", ready=False),  # not ready: not asked
    ]
    for _ in range(READ_ATTEMPTS + 2):
        got = controller.restores_of(REF, pods)
    assert got == {"demo-0": Restore("restored", 7), "demo-1": UNKNOWN}
    assert asked.count(("10.0.0.1", [11211, 11212])) == 1
    assert asked.count(("10.0.0.2", [11211])) == READ_ATTEMPTS
    # A new container start of demo-0 is asked again.
    pods[0] = _pod("demo-0", "t2", host_ip="10.0.0.1", workers=2)
    controller.restores_of(REF, pods)
    assert asked.count(("10.0.0.1", [11211, 11212])) == 2
