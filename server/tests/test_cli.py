"""The command line: memcached-like flags, the same settings from the environment, and clear
exits for bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cacheserver.cli import parse_settings


def test_defaults_match_memcached() -> None:
    s = parse_settings([], environ={})
    # -m: memcached's 64 MB would not follow the container; the default sizes from its limit.
    assert (s.port, s.udp_port, s.listen, s.memory_limit_mb) == (11211, 0, "0.0.0.0", None)
    assert s.max_item_size == 1024 * 1024 and s.conn_limit == 1024


def test_flags_and_environment() -> None:
    s = parse_settings(["-p", "12000", "-U", "12001", "-m", "128", "-I", "2m", "-c", "50"], {})
    assert (s.port, s.udp_port, s.memory_limit_mb, s.max_item_size, s.conn_limit) == (
        12000,
        12001,
        128,
        2 * 1024 * 1024,
        50,
    )
    env = {
        "CACHESERVER_PORT": "13000",
        "CACHESERVER_MEMORY_LIMIT": "auto",
        "CACHESERVER_LISTEN": "127.0.0.2",
        "CACHESERVER_METRICS_PORT": "9150",
        "CACHESERVER_UDP_ALLOW_ALL": "true",
        "CACHESERVER_VERBOSE": "2",
    }
    s = parse_settings([], env)
    assert (s.port, s.memory_limit_mb, s.listen, s.metrics_port) == (13000, None, "127.0.0.2", 9150)
    assert s.udp_allow_all and s.verbose == 2
    assert parse_settings(["-p", "14000"], env).port == 14000  # a flag wins


def test_memcached_switches_for_flush_shutdown_and_dumps() -> None:
    s = parse_settings([], {})
    assert not (s.disable_flush_all or s.enable_shutdown or s.disable_dumping)
    s = parse_settings(["-F", "-A", "-X"], {})
    assert s.disable_flush_all and s.enable_shutdown and s.disable_dumping
    env = {"CACHESERVER_DISABLE_FLUSH_ALL": "true", "CACHESERVER_ENABLE_SHUTDOWN": "yes"}
    s = parse_settings([], env)
    assert s.disable_flush_all and s.enable_shutdown and not s.disable_dumping


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["-p", "70000"], {}, "argument -p/--port: invalid port: 70000 is not a port"),
        (["-m", "lots"], {}, "argument -m/--memory-limit"),
        (["-I", "5x"], {}, "not a size: '5x'"),
        (["-I", "2m", "-m", "1"], {}, "cannot be larger than -m"),
        (["--bogus"], {}, "unrecognized arguments: --bogus"),
        ([], {"CACHESERVER_PORT": "abc"}, "environment variable CACHESERVER_PORT: 'abc' is not"),
        ([], {"CACHESERVER_PIN": "maybe"}, "CACHESERVER_PIN: 'maybe' is not a boolean"),
    ],
)
def test_bad_input_exits_with_a_clear_message(
    argv: list[str], env: dict[str, str], message: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cacheserver", *argv],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_reads_like_memcached() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "cacheserver", "--help"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    for flag in ("--port", "--udp-port", "--listen", "--memory-limit", "--conn-limit"):
        assert flag in result.stdout
    assert "CACHESERVER_PORT" in result.stdout
    assert "1.5.6" in result.stdout  # why UDP is off by default
