"""What the operator reports about warm restarts: each ready appliance's report (read once
per container start, see appliances.py; a real server here) says what it restored, and the
status and events say it."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from cacheoperator.appliances import (
    UNKNOWN,
    ApplianceReport,
    Restore,
    parse_settings,
    pod_restore,
    read_report,
)
from cacheoperator.status import Observed, compute_status, restore_events
from operator_testkit import make_pod, spec_of
from servers import request, start_cacheserver

NOW = "2030-01-01T00:00:00Z"
SETTINGS = "STAT cpus 1\r\nSTAT cpus_allowed 1\r\nEND\r\n"


def test_a_real_appliance_says_what_it_restored(tmp_path: Path) -> None:
    path = tmp_path / "snapshot"
    server = start_cacheserver("-m", "16", "-e", str(path), udp=False)
    try:
        assert read_report("127.0.0.1", server.port).restore == Restore("none", 0)
        for i in range(25):
            request(server, b"set k%d 0 0 1\r\nx\r\n" % i)
    finally:
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=30)
    server = start_cacheserver("-m", "16", "-e", str(path), udp=False, port=server.port)
    try:
        assert read_report("127.0.0.1", server.port).restore == Restore("restored", 25)
    finally:
        server.stop()
    # Nobody listening: the read fails quickly, and the pod's restart is unknown.
    started = time.monotonic()
    with pytest.raises(OSError) as failed:
        read_report("127.0.0.1", server.port, timeout=0.5)
    assert time.monotonic() - started < 2
    assert pod_restore([f"cannot read: {failed.value}"]) is UNKNOWN


def test_workers_are_added_up_and_a_refusal_is_never_hidden() -> None:
    answers = {
        1: "STAT warm_restart restored\r\nSTAT warm_restart_restored_items 10\r\nEND\r\n",
        2: "STAT warm_restart refused\r\nSTAT warm_restart_reason corrupt\r\nEND\r\n",
        3: "STAT warm_restart restored\r\nSTAT warm_restart_restored_items 5\r\nEND\r\n",
        4: "STAT curr_items 0\r\nEND\r\n",  # a server without -e
    }
    reports = {port: parse_settings(SETTINGS, stats) for port, stats in answers.items()}
    assert pod_restore([reports[1], reports[3]]) == Restore("restored", 15)
    assert pod_restore([reports[1], reports[2], reports[3]]) == Restore("refused", 15, "corrupt")
    assert pod_restore([reports[1], reports[4]]) is UNKNOWN
    # A worker that could not be read makes the pod unknown; one not read yet, not known.
    assert pod_restore([reports[1], "cannot read 10.0.0.1:11212: timed out"]) is UNKNOWN
    assert pod_restore([reports[1], None]) is None
    with pytest.raises(ValueError, match="not a count"):
        parse_settings(
            SETTINGS, "STAT warm_restart restored\r\nSTAT warm_restart_restored_items x\r\nEND\r\n"
        )


def _pod(name: str, started: str, **kw):  # type: ignore[no-untyped-def]
    pod = make_pod(name, restarted=0, **kw)
    pod["metadata"]["uid"] = f"uid-{name}"
    pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"] = started
    return pod


def _status(pods, restores, previous=None, **spec):  # type: ignore[no-untyped-def]
    """The status when each pod's one worker reported `restores[pod]`."""
    readings = {
        (pod, 0): ApplianceReport(frozenset({1}), frozenset({1}), None, restore=restore)
        for pod, restore in restores.items()
    }
    return compute_status(
        cluster="demo",
        generation=1,
        spec=spec_of(replicas=len(pods), **spec),
        observed=Observed(pods=pods, readings=readings),
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
    # A pod not read yet is left out; with warm restart off there is nothing to list.
    assert [a["pod"] for a in _status(pods, {"demo-0": restores["demo-0"]})["appliances"]] == [
        "demo-0"
    ]
    assert not _status(pods, restores, warmRestart={"enabled": False}).get("appliances")
