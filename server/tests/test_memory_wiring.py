"""The real server sizes itself: -m auto by default, numbers and sources in stats and /metrics."""

from __future__ import annotations

import subprocess
import sys

from servers import (
    RunningServer,
    free_port,
    metrics_text,
    start_cacheserver,
    stats,
    wait_for_port,
)

MIB = 1 << 20
ENV = "CACHESERVER_CONTAINER_MEMORY_LIMIT"


def test_auto_is_the_default_and_the_env_limit_is_used() -> None:
    server = start_cacheserver(udp=False, env={ENV: str(300 * MIB)})
    try:
        settings = stats(server, "settings")
        general = stats(server)
    finally:
        server.stop()
    assert settings["memory_sizing"] == "auto"
    assert (settings["memory_limit"], settings["memory_limit_source"]) == (str(300 * MIB), "env")
    assert settings["memory_headroom"] == str(32 * MIB)
    capacity = 300 * MIB - int(settings["memory_baseline"]) - 32 * MIB
    assert settings["memory_capacity"] == settings["maxbytes"] == str(capacity)
    assert general["limit_maxbytes"] == str(capacity)
    # A Python interpreter with the server loaded: tens of MiB, not a guess of zero.
    assert 10 * MIB < int(general["memory_resident"]) < 200 * MIB
    assert general["memory_pressure"] == "none"
    for name in ("memory_shrink_events", "memory_bytes_released", "evictions_shrinker"):
        assert general[name] == "0"


def test_explicit_size_and_headroom() -> None:
    server = start_cacheserver(
        "-m", "64", "--memory-headroom", "50", udp=False, env={ENV: str(512 * MIB)}
    )
    try:
        settings = stats(server, "settings")
    finally:
        server.stop()
    assert (settings["memory_sizing"], settings["maxbytes"]) == ("fixed", str(64 * MIB))
    assert settings["memory_headroom"] == str(50 * MIB)


def test_metrics_show_the_memory_layer() -> None:
    metrics_port = free_port()
    server = start_cacheserver(
        "--metrics-port", str(metrics_port), udp=False, env={ENV: str(300 * MIB)}
    )
    try:
        text = metrics_text(metrics_port, server.proc)
    finally:
        server.stop()
    samples = {
        name: float(value)
        for name, value in (line.rsplit(" ", 1) for line in text.splitlines())
        if not name.startswith("#")
    }
    assert samples["cacheappliance_memory_limit_bytes"] == 300 * MIB
    assert samples['cacheappliance_memory_limit_source_info{sizing="auto",source="env"}'] == 1
    assert samples["cacheappliance_memory_shrink_events_total"] == 0
    assert samples["cacheappliance_memory_pressure_level"] == 0
    assert 10 * MIB < samples["cacheappliance_memory_resident_bytes"] < 200 * MIB


def test_a_limit_too_small_is_refused_with_a_reason() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cacheserver", "-l", "127.0.0.1", "-p", str(free_port())],
        env={ENV: str(40 * MIB), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    err = proc.stderr.decode()
    assert "cannot size memory: the memory limit 40.0 MiB (env)" in err
    assert "lower --memory-headroom" in err


def test_a_64_mib_limit_runs_with_a_quarter_as_headroom() -> None:
    server = start_cacheserver(udp=False, env={ENV: str(64 * MIB)})
    try:
        settings = stats(server, "settings")
    finally:
        server.stop()
    assert settings["memory_headroom"] == str(16 * MIB)
    assert int(settings["maxbytes"]) == 64 * MIB - int(settings["memory_baseline"]) - 16 * MIB > 0


def test_workers_share_the_sized_capacity() -> None:
    metrics_port = free_port()
    server = start_cacheserver(
        "-t", "2", "--metrics-port", str(metrics_port), udp=False, env={ENV: str(600 * MIB)}
    )
    second = RunningServer("worker1", server.port + 1, 0, server.proc)
    try:
        wait_for_port(second.port, server.proc)
        first_settings, second_settings = stats(server, "settings"), stats(second, "settings")
        text = metrics_text(metrics_port, server.proc)
    finally:
        server.stop()
    for worker in ("0", "1"):
        assert f'cacheappliance_memory_shrink_events_total{{worker="{worker}"}} 0.0' in text
        assert f'cacheappliance_memory_resident_bytes{{worker="{worker}"}}' in text
    planned = int(first_settings["memory_capacity"])
    # Three interpreters (a supervisor and two workers) count in the baseline.
    assert int(first_settings["memory_baseline"]) > 3 * 10 * MIB
    for settings in (first_settings, second_settings):
        assert settings["memory_capacity"] == str(planned)
        assert settings["maxbytes"] == str(planned // 2)
