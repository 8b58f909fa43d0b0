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
    request,
    scrape,
    start_cacheserver,
)
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
