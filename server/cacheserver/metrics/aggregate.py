"""Metrics of a multi-worker server, gathered from the workers when Prometheus scrapes.

The parent holds no counters of its own: on each scrape it asks every worker for ``stats``,
``stats settings`` and ``stats slabs`` on the worker's admin socket (a Unix socket that
answers ``version`` and ``stats`` without authentication or TLS, so this works with -Y and
-Z too; the same numbers a client sees), turns them into metrics with the table a single
worker uses (metrics/table.py) and labels each worker's series with ``worker``. Nothing is
shared between processes, nothing locks.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cacheserver.config import Settings, worker_path
from cacheserver.metrics.collector import families
from cacheserver.metrics.http import StatsSource, serve_metrics
from cacheserver.metrics.identity import PodIdentity
from cacheserver.metrics.table import GROUPS, UP, reading


def fetch_stats(host: str, port: int, timeout: float = 2.0) -> dict[str, str] | None:
    """``stats`` of one worker over TCP as a dict, or None when it does not answer."""
    reply = ask(lambda: socket.create_connection((host, port), timeout=timeout), b"stats")
    return parse_stats(reply) if reply is not None else None


def fetch_admin(path: str, command: bytes, timeout: float = 2.0) -> bytes | None:
    """A ``stats`` reply from a worker's admin socket, or None when it does not answer."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError:
            sock.close()
            raise
        return sock

    return ask(connect, command)


def ask(connect: Callable[[], socket.socket], command: bytes) -> bytes | None:
    try:
        with connect() as sock:
            sock.sendall(command + b"\r\n")
            data = b""
            while not data.endswith(b"END\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                data += chunk
    except OSError:
        return None
    return data


def parse_stats(reply: bytes) -> dict[str, str]:
    stats: dict[str, str] = {}
    for line in reply.decode(errors="replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            stats[parts[1]] = parts[2]
    return stats


class WorkersCollector(Collector):
    def __init__(self, settings: Settings, ask: StatsSource | None = None) -> None:
        """``settings.admin_socket`` names the workers' admin sockets (run_workers sets one);
        ``ask`` replaces them (a test's own stats source)."""
        self._settings = settings
        self._ask = ask
        self._identity = PodIdentity.from_env()

    def stats(self, worker: int, sub: str = "") -> bytes | None:
        """A worker's ``stats [sub]`` reply, from its admin socket."""
        st = self._settings
        if not 0 <= worker < st.workers:
            return None
        if self._ask is not None:
            return self._ask(worker, sub)
        path = worker_path(st.admin_socket, worker, st.workers)
        return fetch_admin(path, f"stats {sub}".strip().encode())

    def reading(self, worker: int) -> dict[str, str] | None:
        """The worker's stats lines as the metrics table reads them; None when it does not
        answer."""
        replies = {}
        for group in GROUPS:
            reply = self.stats(worker, group)
            if reply is None:
                return None
            replies[group] = parse_stats(reply).items()
        return reading(replies)

    def collect(self) -> Iterator[Metric]:
        readings = [((str(i),), self.reading(i)) for i in range(self._settings.workers)]
        up = GaugeMetricFamily(UP.name, UP.help, labels=["worker"])
        for worker, stats in readings:
            up.add_metric(list(worker), 1 if stats is not None else 0)
        yield up
        yield from self._identity.metrics()
        answered = [(worker, stats) for worker, stats in readings if stats is not None]
        yield from families(answered, ("worker",))


async def serve_aggregated_metrics(settings: Settings) -> asyncio.Server:
    registry = CollectorRegistry(auto_describe=False)
    collector = WorkersCollector(settings)
    registry.register(collector)
    return await serve_metrics(registry, settings.host, settings.metrics_port, collector.stats)
