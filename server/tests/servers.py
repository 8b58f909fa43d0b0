"""Helpers that run real servers for the tests: this project's cacheserver and Debian's
memcached, each as its own process on a free loopback port."""

from __future__ import annotations

import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from testkit.net import free_port, recv_until, wait_for_port


@dataclass
class RunningServer:
    name: str
    port: int
    udp_port: int
    proc: subprocess.Popen[bytes]
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def start_cacheserver(
    *args: str,
    udp: bool = True,
    env: dict[str, str] | None = None,
    port: int = 0,
    max_files: int | None = None,
) -> RunningServer:
    """Start one on a free port, or on ``port`` (e.g. to restart one where it was);
    ``max_files``: its limit of open file descriptors (RLIMIT_NOFILE)."""
    port = port or free_port()
    cmd = [sys.executable, "-m", "cacheserver", "-l", "127.0.0.1", "-p", str(port)]
    if udp:
        cmd += ["-U", str(port)]
    cmd += list(args)
    full_env = {**os.environ, **(env or {})}

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, max_files))

    proc = subprocess.Popen(
        cmd,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=limit_files if max_files is not None else None,
    )
    try:
        wait_for_port(port, proc)
    except Exception:
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise RuntimeError(f"cacheserver did not start: {err.decode(errors='replace')}") from None
    return RunningServer("cacheserver", port, port if udp else 0, proc)


def run_to_exit(
    termination_log: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run a cacheserver that should stop by itself (it cannot run) on loopback, with
    ``termination_log`` as the file Kubernetes reads the reason from (the kubelet creates it;
    a missing one is left missing) and none of the test run's CACHESERVER_* variables."""
    return subprocess.run(
        [sys.executable, "-m", "cacheserver", "-l", "127.0.0.1", *args],
        env={
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "CACHESERVER_TERMINATION_LOG": str(termination_log),
            **(env or {}),
        },
        capture_output=True,
        timeout=30,
    )


def start_memcached(*args: str, udp: bool = True) -> RunningServer:
    binary = shutil.which("memcached")
    if binary is None:
        pytest.fail("memcached is not installed: run scripts/bootstrap.sh (make test does)")
    port = free_port()
    cmd = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", str(port if udp else 0)]
    if os.geteuid() == 0:
        cmd += ["-u", "root"]
    cmd += list(args)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, proc)
    return RunningServer("memcached", port, port if udp else 0, proc)


def request(server: RunningServer, payload: bytes, terminator: bytes = b"\r\n") -> bytes:
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(payload)
        return recv_until(sock, terminator)


def stats(server: RunningServer, sub: str = "") -> dict[str, str]:
    """`stats [sub]` of a server as text names and values."""
    reply = request(server, f"stats {sub}".strip().encode() + b"\r\n", b"END\r\n").decode()
    return {
        parts[1]: parts[2]
        for parts in (line.split(" ", 2) for line in reply.splitlines())
        if len(parts) == 3 and parts[0] == "STAT"
    }


def metrics_text(port: int, proc: subprocess.Popen[bytes]) -> str:
    """The /metrics page of a server's metrics port (it may open after the memcached port)."""
    wait_for_port(port, proc)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def scrape(server: RunningServer, port: int) -> dict[tuple[str, tuple], float]:
    """Every sample of a server's /metrics: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics_text(port, server.proc))
        for s in family.samples
    }


def memcaslap_totals(output: str) -> dict[str, int]:
    """The 'name: number' totals memcaslap prints at the end of a run."""
    totals: dict[str, int] = {}
    for line in output.splitlines():
        name, sep, value = line.partition(":")
        if sep and value.strip().isdigit():
            totals[name.strip()] = int(value)
    return totals
