"""What the pod itself and the operator read from a server whose port needs credentials:
the admin socket (version and stats only, for the probe and the supervisor of -t N) and
the HTTP endpoint's /stats and /stats/settings (for the operator)."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from cacheserver.metrics.aggregate import parse_stats
from servers import free_port, recv_until, start_cacheserver, wait_for_port

CREDENTIALS = b"alice:secret\n"


@pytest.fixture
def secured(tmp_path: Path):
    """A -Y server with an admin socket and a metrics port; its two workers with -t 2."""
    creds = tmp_path / "credentials"
    creds.write_bytes(CREDENTIALS)
    metrics = free_port()
    admin = str(tmp_path / "admin.sock")

    def start(workers: int = 1):
        server = start_cacheserver(
            *("-Y", str(creds), "--admin-socket", admin, "--metrics-port", str(metrics)),
            *("-t", str(workers)),
            udp=False,
        )
        server.extra["metrics"] = metrics
        # The metrics port (the supervisor's, with -t N) and the other workers' ports may open
        # after worker 0's.
        for port in (metrics, *(server.port + i for i in range(1, workers))):
            wait_for_port(port, server.proc)
        return server

    started = []

    def factory(workers: int = 1):
        started.append(start(workers))
        return started[-1], admin

    yield factory
    for server in started:
        server.stop()


def _ask_unix(path: str, payload: bytes, end: bytes = b"\r\n") -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        sock.sendall(payload)
        return recv_until(sock, end)


def test_the_admin_socket_answers_version_and_stats_only(secured) -> None:
    server, admin = secured()
    assert stat.S_IMODE(os.stat(admin).st_mode) == 0o600
    assert _ask_unix(admin, b"version\r\n").startswith(b"VERSION ")
    assert parse_stats(_ask_unix(admin, b"stats settings\r\n", b"END\r\n"))["auth_enabled_ascii"]
    refused = b"SERVER_ERROR command not allowed on the admin socket\r\n"
    assert _ask_unix(admin, b"get k\r\n") == refused
    assert _ask_unix(admin, b"flush_all\r\n") == refused
    # The TCP port still wants credentials.
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(b"version\r\n")
        assert recv_until(sock, b"\r\n") == b"CLIENT_ERROR unauthenticated\r\n"


def _probe(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CACHESERVER_")}
    return subprocess.run(
        [sys.executable, "-m", "cacheserver.probe", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


def test_the_probe_gets_through_the_admin_socket_not_the_port(secured) -> None:
    server, admin = secured()
    assert _probe("--admin-socket", admin).returncode == 0
    refused = _probe("-l", "127.0.0.1", "-p", str(server.port))
    assert refused.returncode == 1 and "unauthenticated" in refused.stderr


def _http(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_stats_over_http_need_no_credentials(secured, workers: int) -> None:
    server, admin = secured(workers)
    port = server.extra["metrics"]
    for worker in range(workers):
        status, text = _http(port, f"/stats/settings?worker={worker}")
        assert status == 200 and text.endswith("END\r\n")
        assert parse_stats(text.encode())["tcpport"] == str(server.port + worker)
        status, text = _http(port, f"/stats?worker={worker}")
        assert status == 200 and "STAT auth_cmds 0" in text
    assert _http(port, f"/stats?worker={workers}")[0] == 404
    # With -t 2 the supervisor reads its workers through their admin sockets, -Y or not.
    status, text = _http(port, "/metrics")
    assert status == 200
    if workers > 1:
        for worker in range(workers):
            assert f'memcached_up{{worker="{worker}"}} 1.0' in text
            assert _ask_unix(f"{admin}.{worker}", b"version\r\n").startswith(b"VERSION ")
