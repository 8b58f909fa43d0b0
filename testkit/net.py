"""Sockets in tests: a free port, waiting for a server to listen on it, reading a reply."""

from __future__ import annotations

import random
import socket
import subprocess
import time

# Below Linux's default ephemeral range (32768-60999), so a client socket's local port never
# takes a port a server here is about to bind (worker i of -t N binds port+i).
PORT_RANGE = (20000, 32000)


def free_port(span: int = 8, host: str = "127.0.0.1") -> int:
    """A port whose ``span`` consecutive ports are all free for TCP and UDP on ``host``."""
    for _ in range(200):
        base = random.randrange(PORT_RANGE[0], PORT_RANGE[1] - span)
        if all(_bindable(host, base + i) for i in range(span)):
            return base
    raise RuntimeError("no free port range found")


def _bindable(host: str, port: int) -> bool:
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        with socket.socket(socket.AF_INET, kind) as s:
            try:
                s.bind((host, port))
            except OSError:
                return False
    return True


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float = 15.0, host: str = "127.0.0.1"
) -> None:
    """Until something accepts on ``host:port``; an error as soon as ``proc`` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early with code {proc.returncode}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


def recv_until(sock: socket.socket, terminator: bytes, timeout: float = 5.0) -> bytes:
    """Read until the data ends with ``terminator`` (or the peer closes)."""
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(terminator):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data
