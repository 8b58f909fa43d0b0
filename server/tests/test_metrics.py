"""Stats and the Prometheus endpoint read the same per-worker counters."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cacheserver.config import Settings, worker_path
from cacheserver.metrics import table
from cacheserver.metrics.aggregate import WorkersCollector, fetch_admin, parse_stats
from cacheserver.metrics.collector import ServerCollector
from cacheserver.metrics.counters import Counters
from cacheserver.metrics.identity import PodIdentity
from cacheserver.metrics.stats_report import StatsReport
from cacheserver.metrics.table import FAMILIES, GROUPS, POD, Family, counter, info, reading
from cacheserver.storage import Store
from servers import (
    free_port,
    metrics_text,
    recv_until,
    request,
    scrape,
    start_cacheserver,
    stats,
)
from testkit.procs import cpu_seconds
from tlscerts import make_certificates, tls_args


def test_metrics_endpoint_reports_memcached_exporter_names() -> None:
    metrics_port = free_port()
    server = start_cacheserver("-m", "64", "--metrics-port", str(metrics_port))
    try:
        request(server, b"set a 0 0 1\r\n1\r\nget a\r\nget b\r\n", b"END\r\n")
        samples = scrape(server, metrics_port)
        assert samples[("memcached_up", ())] == 1
        assert samples[("memcached_commands_total", (("command", "get"), ("status", "hit")))] == 1
        assert samples[("memcached_commands_total", (("command", "get"), ("status", "miss")))] == 1
        assert samples[("memcached_commands_total", (("command", "set"), ("status", "hit")))] == 1
        assert samples[("memcached_current_items", ())] == 1
        assert samples[("memcached_limit_bytes", ())] == 64 * 1024 * 1024
        assert samples[("memcached_current_connections", ())] == 0
        assert samples[("memcached_connections_total", ())] >= 1
        assert samples[("memcached_read_bytes_total", ())] > 0
        # The latency histogram samples 1 read in 64: a short session may have no sample yet,
        # but the series exist and the +Inf bucket equals the sample count.
        inf = samples[("cacheappliance_request_duration_seconds_bucket", (("le", "+Inf"),))]
        assert inf == samples[("cacheappliance_request_duration_seconds_count", ())]
    finally:
        server.stop()


def test_stats_counts_match_the_traffic() -> None:
    server = start_cacheserver()
    try:
        request(server, b"set a 0 0 1\r\n1\r\nget a a b\r\ndelete b\r\nincr a 2\r\n", b"3\r\n")
        stats = dict(
            line.split(" ", 2)[1:]
            for line in request(server, b"stats\r\n", b"END\r\n").decode().splitlines()
            if line.startswith("STAT ")
        )
        assert stats["cmd_get"] == "3" and stats["get_hits"] == "2" and stats["get_misses"] == "1"
        assert stats["cmd_set"] == "1" and stats["delete_misses"] == "1"
        assert stats["incr_hits"] == "1" and stats["curr_items"] == "1"
        assert request(server, b"stats reset\r\n") == b"RESET\r\n"
        assert b"STAT cmd_get 0\r\n" in request(server, b"stats\r\n", b"END\r\n")
        assert request(server, b"stats nonsense\r\n") == b"ERROR\r\n"
    finally:
        server.stop()


def test_latency_histogram_samples_one_read_in_64() -> None:
    metrics_port = free_port()
    server = start_cacheserver("--metrics-port", str(metrics_port))
    try:
        with socket.create_connection(server.address, timeout=5) as sock:
            for _ in range(64 * 3):  # one request per round trip: one read each
                sock.sendall(b"get nothing\r\n")
                assert sock.recv(100) == b"END\r\n"
        text = metrics_text(metrics_port, server.proc)
        families = {f.name: f for f in text_string_to_metric_families(text)}
        hist = families["cacheappliance_request_duration_seconds"]
        count = next(s.value for s in hist.samples if s.name.endswith("_count"))
        total = next(s.value for s in hist.samples if s.name.endswith("_sum"))
        assert count == 3
        assert 0 < total < 1  # three reads took some time, and well under a second
    finally:
        server.stop()


def test_pod_info_reports_the_downward_api_env_with_one_or_many_workers() -> None:
    env = {
        "POD_NAME": "cache-p1-0",
        "NODE_NAME": "node-2",
        "HOST_IP": "127.0.0.2",
        "CACHESERVER_PARTITION": "1",
    }
    expected = (
        "cacheappliance_pod_info",
        (
            ("host_ip", "127.0.0.2"),
            ("node_name", "node-2"),
            ("partition_number", "1"),
            ("pod_name", "cache-p1-0"),
        ),
    )
    for workers in ("1", "2"):
        metrics_port = free_port()
        server = start_cacheserver(
            "-t", workers, "--metrics-port", str(metrics_port), udp=False, env=env
        )
        try:
            samples = scrape(server, metrics_port)
        finally:
            server.stop()
        pod_info = [k for k in samples if k[0] == expected[0]]
        assert samples.get(expected) == 1, f"-t {workers}: {pod_info}"


def test_pod_info_outside_kubernetes_has_empty_labels() -> None:
    metrics_port = free_port()
    server = start_cacheserver(
        "--metrics-port",
        str(metrics_port),
        env={"POD_NAME": "", "NODE_NAME": "", "HOST_IP": "", "CACHESERVER_PARTITION": ""},
    )
    try:
        samples = scrape(server, metrics_port)
    finally:
        server.stop()
    # Unset variables leave their labels out: the series is there, with no placement.
    assert samples[("cacheappliance_pod_info", ())] == 1


# ---- one table feeds stats, /metrics and the -t N aggregation ----------------------------


def exported_names(family: Family) -> set[str]:
    """The sample names a family shows in /metrics."""
    if family.kind == "histogram":
        return {f"{family.name}_{suffix}" for suffix in ("bucket", "count", "sum")}
    return {family.name}


@pytest.fixture
def every_feature(tmp_path: Path) -> list[str]:
    """Flags that turn on every part of the server the metrics table reports on: -Y, -Z
    (with a plaintext listener), auto discovery and warm restart."""
    creds = tmp_path / "credentials"
    creds.write_text("alice:secret\n")
    members = tmp_path / "members.json"
    members.write_text('{"version": 3, "nodes": [{"host": "a", "ip": "10.0.0.1", "port": 1}]}')
    certs = make_certificates(tmp_path)
    return [
        *("-Y", str(creds), *tls_args(certs), "-l", f"notls:127.0.0.1:{free_port()}"),
        *("--cluster-config", str(members), "-e", str(tmp_path / "snapshot")),
    ]


@pytest.mark.parametrize("workers", [1, 2])
def test_every_family_of_the_table_is_exported_from_stats(
    every_feature: list[str], tmp_path: Path, workers: int
) -> None:
    metrics_port = free_port()
    admin = str(tmp_path / "admin.sock")
    server = start_cacheserver(
        *every_feature,
        *("-t", str(workers), "--admin-socket", admin, "--metrics-port", str(metrics_port)),
        udp=False,
    )
    try:
        path = worker_path(admin, workers - 1, workers)  # the last worker to start
        wait_for_path(path, server.proc)
        samples = scrape(server, metrics_port)
        replies = {group: fetch_admin(path, f"stats {group}".strip().encode()) for group in GROUPS}
    finally:
        server.stop()
    lines = reading({group: parse_stats(reply).items() for group, reply in replies.items()})
    for family in FAMILIES:
        names = exported_names(family)
        found = [labels for name, labels in samples if name in names]
        assert found, f"{family.name}: not exported with -t {workers}"
        if workers > 1 and family is not POD:  # the pod is the same for every worker
            assert all("worker" in dict(labels) for labels in found), found
            assert any(("worker", str(workers - 1)) in labels for labels in found), found
        for key in family.stats:
            prefix = f"{key}_" if family.kind == "histogram" else key
            assert any(line.startswith(prefix) for line in lines), f"{family.name}: {key}"


def wait_for_path(path: str, proc: subprocess.Popen[bytes]) -> None:
    """Until ``path`` exists (an admin socket: its worker is serving)."""
    deadline = time.monotonic() + 15
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, path
        time.sleep(0.05)


def test_a_family_added_to_the_table_is_exported_alone_and_with_workers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The two collectors know no metric of their own: add a line to the table and both
    export it, from the same stats lines, with the same series."""
    report = StatsReport(Settings(), Store(1 << 20), Counters(), "1.6.18-test")
    report.counters.idle_kicks = 3  # in `stats`, not exported yet
    single = CollectorRegistry(auto_describe=False)
    single.register(ServerCollector(report, PodIdentity.from_env({})))
    workers = CollectorRegistry(auto_describe=False)
    ask = lambda worker, sub: report(sub.encode())  # noqa: E731 -- both workers: this report
    workers.register(WorkersCollector(Settings(workers=2), ask))
    kicks = "cacheappliance_idle_kicks_total"
    added = (
        counter(kicks, "Connections closed for idling.", "idle_kicks"),
        info("cacheappliance_binding_info", "The protocol.", binding="settings binding_protocol"),
    )

    def series(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
        text = generate_latest(registry).decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    assert not {name for name, _ in series(single)} & {kicks, "cacheappliance_binding_info"}
    monkeypatch.setattr(table, "FAMILIES", (*table.FAMILIES, *added))
    alone, together = series(single), series(workers)
    assert alone[(kicks, ())] == 3
    assert alone[("cacheappliance_binding_info", (("binding", "ascii"),))] == 1
    for worker in ("0", "1"):
        assert together[(kicks, (("worker", worker),))] == 3
        binding = (("binding", "ascii"), ("worker", worker))
        assert together[("cacheappliance_binding_info", binding)] == 1
    # Every series of one worker alone is there for each worker of -t N, with the same value
    # (but the clocks, which moved between the two scrapes).
    moving = {"memcached_time_seconds", "memcached_uptime_seconds", "memcached_process"}
    for (name, labels), value in alone.items():
        for worker in ("0", "1") if name != POD.name else ():
            other = together[(name, tuple(sorted((*labels, ("worker", worker)))))]
            assert other == value or name.startswith(tuple(moving)), name


# ---- memcached_exporter's metrics, with the values memcached's would have -----------------


def test_the_memcached_exporter_metrics_follow_what_the_server_does() -> None:
    metrics_port = free_port()
    server = start_cacheserver("-m", "1", "--metrics-port", str(metrics_port), udp=False)
    try:
        version = request(server, b"version\r\n").split()[1].decode()
        before = scrape(server, metrics_port)
        # -m 1 holds 1 MiB: the largest value -I 1m allows (an item is the value, its key,
        # \r\n and memcached's 57-byte header) does not fit with what this server's items
        # cost besides; one byte more is over -I.
        largest = 1024 * 1024 - 57 - len(b"big") - 2
        for size, error in (
            (largest, b"SERVER_ERROR out of memory storing object\r\n"),
            (largest + 1, b"SERVER_ERROR object too large for cache\r\n"),
        ):
            assert request(server, b"set big 0 0 %d\r\n%s\r\n" % (size, b"x" * size)) == error
        request(server, b"set small 0 0 5\r\nhello\r\n")
        cpu_before = cpu_seconds(server.proc.pid)
        after = scrape(server, metrics_port)
        cpu_after = cpu_seconds(server.proc.pid)
        malloced = stats(server, "slabs")["total_malloced"]
    finally:
        server.stop()
    assert after[("memcached_version", (("version", version),))] == 1
    assert abs(after[("memcached_time_seconds", ())] - time.time()) < 5
    for name in ("memcached_item_no_memory_total", "memcached_item_too_large_total"):
        assert (before[(name, ())], after[(name, ())]) == (0, 1), name
    assert before[("memcached_malloced_bytes", ())] == 0
    assert after[("memcached_malloced_bytes", ())] == int(malloced) > 0
    user = after[("memcached_process_user_cpu_seconds_total", ())]
    system = after[("memcached_process_system_cpu_seconds_total", ())]
    # The kernel's count, in clock ticks, read just before and after the scrape.
    assert cpu_before[0] - 0.02 <= user <= cpu_after[0] + 0.02
    assert cpu_before[1] - 0.02 <= system <= cpu_after[1] + 0.02
    assert after[("memcached_accepting_connections", ())] == 1
    assert after[("memcached_connections_listener_disabled_total", ())] == 0
    # No -R here: a read's requests are served whole, nothing yields.
    assert after[("memcached_connections_yielded_total", ())] == 0


def test_out_of_file_descriptors_the_listener_pauses_and_is_counted() -> None:
    """As memcached: a process out of descriptors stops accepting for a moment (the clients
    wait in the backlog), which `stats` and /metrics count, and takes them once it can."""
    metrics_port = free_port()
    server = start_cacheserver(
        "-c", "1000", "--metrics-port", str(metrics_port), udp=False, max_files=64
    )
    clients: list[socket.socket] = []
    try:
        metrics_text(metrics_port, server.proc)
        with socket.create_connection(server.address, timeout=5) as watcher:

            def watch() -> dict[str, str]:
                watcher.sendall(b"stats\r\n")
                reply = recv_until(watcher, b"END\r\n").decode()
                return dict(line.split(" ", 2)[1:] for line in reply.splitlines()[:-1])

            assert (watch()["accepting_conns"], watch()["listen_disabled_num"]) == ("1", "0")
            # More clients than the process has descriptors for: connected (the kernel's
            # backlog), not all accepted.
            clients += [socket.create_connection(server.address, timeout=5) for _ in range(80)]
            deadline = time.monotonic() + 5
            while (now := watch())["accepting_conns"] != "0":
                assert time.monotonic() < deadline, now
                time.sleep(0.02)
            assert int(now["listen_disabled_num"]) >= 1
            assert int(now["curr_connections"]) < 80
            for client in clients:
                client.close()
            # Once descriptors are free, the server accepts again.
            assert request(server, b"version\r\n").startswith(b"VERSION ")
        samples = scrape(server, metrics_port)
    finally:
        for client in clients:
            client.close()
        server.stop()
    assert samples[("memcached_connections_listener_disabled_total", ())] >= 1
    assert samples[("memcached_accepting_connections", ())] == 1
