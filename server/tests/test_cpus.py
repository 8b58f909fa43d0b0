"""What the server reports about its CPUs: the list format the kernel uses, and a real
server's `stats settings` with and without --pin."""

from __future__ import annotations

import os

import pytest

from cacheserver.cpus import CpuPlacement, format_cpu_list, online_cpus, parse_cpu_list
from servers import RunningServer, start_cacheserver, stats, wait_for_port


@pytest.mark.parametrize(
    ("cpus", "text"),
    [
        (set(), ""),
        ({3}, "3"),
        ({2, 3}, "2-3"),
        ({0, 1, 2, 5}, "0-2,5"),
        ({0, 2, 4, 5, 6, 9}, "0,2,4-6,9"),
    ],
)
def test_cpu_lists_are_written_as_the_kernel_writes_them(cpus, text):
    assert format_cpu_list(cpus) == text
    assert parse_cpu_list(text) == frozenset(cpus)


def test_parsing_takes_the_sysfs_newline_and_refuses_garbage():
    assert parse_cpu_list("0-3,8-11\n") == frozenset({0, 1, 2, 3, 8, 9, 10, 11})
    for bad in ("a", "1-", "3-1", "1,,x"):
        with pytest.raises(ValueError, match="not a CPU list"):
            parse_cpu_list(bad)


def test_online_cpus_come_from_sysfs(tmp_path):
    assert online_cpus(tmp_path) is None  # no sysfs: unknown, not a guess
    path = tmp_path / "sys/devices/system/cpu/online"
    path.parent.mkdir(parents=True)
    path.write_text("0-7\n")
    assert online_cpus(tmp_path) == frozenset(range(8))
    placement = CpuPlacement(allowed=frozenset({2, 3}), bound=frozenset({2}), online=None)
    assert placement.settings() == [("cpus", "2"), ("cpus_allowed", "2-3"), ("cpus_online", "-")]


def reported(server: RunningServer) -> tuple[frozenset[int], frozenset[int], frozenset[int]]:
    settings = stats(server, "settings")
    return (
        parse_cpu_list(settings["cpus"]),
        parse_cpu_list(settings["cpus_allowed"]),
        parse_cpu_list(settings["cpus_online"]),
    )


def test_an_unpinned_server_reports_the_cpus_it_may_use():
    server = start_cacheserver(udp=False)
    try:
        cpus, allowed, online = reported(server)
    finally:
        server.stop()
    assert cpus == allowed == frozenset(os.sched_getaffinity(0))
    assert allowed <= online


def test_pinned_workers_each_report_one_cpu_of_their_own():
    mine = sorted(os.sched_getaffinity(0))
    if len(mine) < 2:
        pytest.skip("one CPU: two workers cannot have one each")
    server = start_cacheserver("-t", "2", "--pin", udp=False)
    second = RunningServer("worker1", server.port + 1, 0, server.proc)
    try:
        wait_for_port(second.port, server.proc)
        first_cpus, first_allowed, _ = reported(server)
        second_cpus, second_allowed, _ = reported(second)
    finally:
        server.stop()
    # Worker i is bound to the i-th CPU of the set the server was started with.
    assert (first_cpus, second_cpus) == ({mine[0]}, {mine[1]})
    assert first_allowed == second_allowed == frozenset(mine)
