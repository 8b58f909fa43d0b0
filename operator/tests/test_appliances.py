"""Reading what appliances report, from a real cacheserver: one read, and the background
reader that passes use (never blocking them, one more pass once the reads are in). What
the reports say about warm restarts is in test_warm_status.py."""

from __future__ import annotations

import os
import threading

import pytest

from cacheoperator.appliances import (
    UNKNOWN,
    ApplianceReport,
    ApplianceReports,
    Restore,
    Target,
    parse_settings,
    pod_restores,
    read_report,
    targets_of,
)
from cacheoperator.status import endpoints
from operator_testkit import make_pod
from servers import free_port, start_cacheserver

MIB = 1 << 20


@pytest.fixture(scope="module")
def server():
    running = start_cacheserver(
        "--pin", udp=False, env={"CACHESERVER_CONTAINER_MEMORY_LIMIT": str(256 * MIB)}
    )
    yield running
    running.stop()


def target(port: int, pod: str = "demo-0", instance: str = "uid-1/c1") -> Target:
    return Target("cache", "demo", pod, instance, 0, "127.0.0.1", port)


def test_one_read_gives_the_cpus_and_the_memory_limit(server):
    report = read_report("127.0.0.1", server.port, timeout=2)
    mine = sorted(os.sched_getaffinity(0))
    assert report.cpus == {mine[0]}  # --pin: the first CPU of the set it was given
    assert report.cpus_allowed == frozenset(mine)
    assert report.cpus_online is not None and report.cpus_allowed <= report.cpus_online
    assert (report.memory_limit, report.memory_limit_source) == (256 * MIB, "env")
    assert report.restore is UNKNOWN  # it runs without warm restart (-e)


def test_a_reply_without_cpus_is_no_report():
    with pytest.raises(ValueError, match="no cpus"):
        parse_settings("STAT maxbytes 67108864\r\nSTAT tcpport 11211\r\nEND\r\n")


def test_a_port_nobody_listens_on_fails_fast():
    with pytest.raises(OSError):
        read_report("127.0.0.1", free_port(), timeout=1)


class Passes:
    """Records the passes the reader asks for."""

    def __init__(self):
        self.calls: list[tuple[str, str]] = []
        self.event = threading.Event()

    def __call__(self, namespace: str, cluster: str) -> None:
        self.calls.append((namespace, cluster))
        self.event.set()


def test_a_pass_gets_nothing_at_first_then_one_more_pass_brings_the_report(server):
    passes = Passes()
    reports = ApplianceReports(notify=passes, timeout=2)
    try:
        assert reports.readings([target(server.port)]) == {("demo-0", 0): None}
        assert passes.event.wait(5)
        assert passes.calls == [("cache", "demo")]
        (reading,) = reports.readings([target(server.port)]).values()
        assert isinstance(reading, ApplianceReport) and reading.memory_limit == 256 * MIB
        # Read once per container: further passes read nothing more.
        passes.event.clear()
        reports.readings([target(server.port)])
        assert not passes.event.wait(0.3)
    finally:
        reports.close()


def test_a_new_container_is_read_again_and_the_old_one_forgotten(server):
    passes = Passes()
    reports = ApplianceReports(notify=passes, timeout=2)
    try:
        reports.readings([target(server.port)])
        assert passes.event.wait(5)
        passes.event.clear()
        restarted = target(server.port, instance="uid-1/c2")
        assert reports.readings([restarted]) == {("demo-0", 0): None}
        assert passes.event.wait(5)
        assert len(reports._entries) == 1
    finally:
        reports.close()


def test_a_failed_read_says_why_and_is_tried_again_later():
    passes = Passes()
    now = [0.0]
    reports = ApplianceReports(notify=passes, timeout=1, clock=lambda: now[0])
    unreachable = target(free_port())
    try:
        reports.readings([unreachable])
        assert passes.event.wait(5)
        (reading,) = reports.readings([unreachable]).values()
        assert isinstance(reading, str) and reading.startswith("cannot read 127.0.0.1:")
        passes.event.clear()
        reports.readings([unreachable])  # too soon: not read again
        assert not passes.event.wait(0.3)
        now[0] = 60.0  # past the retry time: the waiting retry asks for a pass...
        with reports._wake:
            reports._wake.notify()
        assert passes.event.wait(5)
        passes.event.clear()
        reports.readings([unreachable])  # ...which reads again
        assert passes.event.wait(5)
    finally:
        reports.close()


def _pod(name: str, container: str, **kw):
    pod = make_pod(name, restarted=0, **kw)
    pod["metadata"]["uid"] = f"uid-{name}"
    pod["status"]["containerStatuses"][0]["containerID"] = f"containerd://{container}"
    return pod


def test_each_container_start_is_read_once_and_a_silent_one_again_only_later():
    asked: list[tuple[str, int]] = []

    def read(target: Target, timeout: float) -> ApplianceReport:
        asked.append((target.address, target.port))
        if target.address == "10.0.0.2":
            raise ConnectionRefusedError("connection refused")
        cpus = frozenset({1})
        return ApplianceReport(cpus, cpus, None, restore=Restore("restored", 7))

    passes = Passes()
    now = [0.0]
    reports = ApplianceReports(notify=passes, read=read, clock=lambda: now[0])
    pods = [
        _pod("demo-0", "c1", host_ip="10.0.0.1", workers=2),
        _pod("demo-1", "c1", host_ip="10.0.0.2"),
        _pod("demo-2", "c1", host_ip="10.0.0.3", ready=False),  # not ready: not asked
    ]
    workers = {"demo-0": [0, 1], "demo-1": [0]}

    def a_pass():
        return reports.readings(targets_of("cache", "demo", endpoints(pods, {}), pods))

    try:
        assert set(a_pass().values()) == {None}  # the pass never waits for a read
        assert passes.event.wait(5)
        for _ in range(5):
            readings = a_pass()
        assert pod_restores(workers, readings) == {
            "demo-0": Restore("restored", 14),
            "demo-1": UNKNOWN,
        }
        assert sorted(asked) == [("10.0.0.1", 11211), ("10.0.0.1", 11212), ("10.0.0.2", 11211)]
        # The silent one is asked again once its retry is due, not on every pass.
        passes.event.clear()
        now[0] = 60.0
        with reports._wake:
            reports._wake.notify()
        assert passes.event.wait(5)
        passes.event.clear()
        a_pass()
        assert passes.event.wait(5)
        assert asked.count(("10.0.0.2", 11211)) == 2
        # A new container start of demo-0 is asked again, and unknown until it answers.
        pods[0] = _pod("demo-0", "c2", host_ip="10.0.0.1", workers=2)
        passes.event.clear()
        assert "demo-0" not in pod_restores(workers, a_pass())
        assert passes.event.wait(5)
        assert asked.count(("10.0.0.1", 11211)) == asked.count(("10.0.0.1", 11212)) == 2
        assert pod_restores(workers, a_pass())["demo-0"] == Restore("restored", 14)
    finally:
        reports.close()
