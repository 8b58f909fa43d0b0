"""Stats and the Prometheus endpoint read the same per-worker counters."""

from __future__ import annotations

import socket

from prometheus_client.parser import text_string_to_metric_families

from servers import free_port, metrics_text, request, scrape, start_cacheserver


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
