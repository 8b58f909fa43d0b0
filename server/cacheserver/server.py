"""One worker: an event loop serving one shard (its own store, counters and ports).

Assembles the layers: storage (Store), protocol (Commands), network (TCP, UDP), metrics
(stats report, Prometheus collector), discovery (the cluster membership). Background duties
run as timers on the same loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable
from functools import partial

from prometheus_client import CollectorRegistry

from cacheserver import __version__
from cacheserver.config import Settings, worker_path
from cacheserver.cpus import CpuPlacement
from cacheserver.discovery.watch import ClusterConfig
from cacheserver.fastpath import make_engine
from cacheserver.metrics.collector import ServerCollector
from cacheserver.metrics.counters import Counters
from cacheserver.metrics.http import serve_metrics
from cacheserver.metrics.latency import LatencyHistogram
from cacheserver.metrics.stats_report import StatsReport
from cacheserver.network.tcp import TCPServer
from cacheserver.network.udp import UDPServer
from cacheserver.protocol.commands import Commands
from cacheserver.security import tls as tls_settings
from cacheserver.security.credentials import CredentialsFile
from cacheserver.security.tls import ServerTLS
from cacheserver.storage import Store
from cacheserver.storage.snapshot import Identity
from cacheserver.warm import WarmRestart, snapshot_path

log = logging.getLogger("cacheserver")

# What `version` answers: the memcached protocol level this server speaks, then its own name.
VERSION = f"1.6.18-cacheserver-{__version__}"
SWEEP_PERIOD = 1.0  # seconds between background steps (expiry crawl, idle check)
CRAWL_BUDGET = 20_000  # keys checked for expiry per step: bounded work per tick


class Worker:
    def __init__(
        self,
        settings: Settings,
        capacity: int | None = None,
        worker_index: int = 0,
        cpus_allowed: frozenset[int] | None = None,
        workers: int = 1,
        memory_budget: str | None = None,
    ) -> None:
        """`cpus_allowed`: the CPUs the process had before --pin bound it to one (reported
        in `stats settings` next to the CPUs it runs on now); ``workers``: how many workers
        the server runs (``settings`` are this worker's own); ``memory_budget``: what sized
        the memory, which a warm restart must share."""
        self.settings = settings
        self.worker_index = worker_index
        self.workers = workers
        self.store = Store(
            capacity if capacity is not None else settings.memory_limit_bytes,
            max_item_size=settings.max_item_size,
        )
        self.counters = Counters()
        # Told of cache_memlimit's new size after the store (the memory layer's shrinker).
        self.memlimit_listeners: list[Callable[[int], None]] = []
        self.report = StatsReport(settings, self.store, self.counters, VERSION)
        # -Y: memcached's text-protocol authentication; reloaded when the file changes.
        self.credentials = CredentialsFile(settings.auth_file) if settings.auth_file else None
        # -Z: the TLS listeners' certificates; reloaded when the files change.
        self.tls = ServerTLS(settings) if settings.ssl_enabled else None
        self.commands = Commands(
            self.store,
            self.counters,
            VERSION,
            self.report,
            flush_enabled=not settings.disable_flush_all,
            dump_enabled=not settings.disable_dumping,
            on_shutdown=partial(_shutdown, workers) if settings.enable_shutdown else None,
            on_memlimit=self.set_memlimit,
            refresh_certs=self.tls.refresh if self.tls is not None else None,
        )
        # ElastiCache's auto discovery, when the operator gave a membership file.
        self.discovery = ClusterConfig(settings.cluster_config) if settings.cluster_config else None
        latency = LatencyHistogram()
        # One compiled fast path per worker, shared by its TCP and UDP servers; None when it
        # was not built or --python-only asks for the Python path alone.
        self.engine = (
            None
            if settings.python_only
            else make_engine(self.store, self.counters, latency, self.commands)
        )
        self.tcp = TCPServer(
            self.commands,
            self.counters,
            settings.conn_limit,
            settings.idle_timeout,
            latency,
            self.engine,
            self.discovery,
            self.credentials,
        )
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = ServerCollector(self.report)
        self.report.accepting = lambda: self.tcp.accepting
        self.report.extra_general.append(self.tcp.latency.stats_fields)
        self.report.extra_settings.append(
            lambda: [("fast_path", "compiled" if self.engine is not None else "python")]
        )
        self.cpus = CpuPlacement.observe(cpus_allowed)
        self.report.extra_settings.append(self.cpus.settings)
        if self.discovery is not None:
            self.report.extra_general.append(self.discovery.stats_fields)
            self.report.extra_settings.append(self.discovery.settings_fields)
        if self.credentials is not None:
            self.report.extra_general.append(self.credentials.stats_fields)
        self.report.extra_settings.append(lambda: tls_settings.settings_fields(settings))
        if self.tls is not None:
            counters = self.counters
            self.report.extra_general.append(
                lambda: [("ssl_handshake_errors", counters.ssl_handshake_errors)]
            )
            self.report.extra_general.append(self.tls.stats_fields)
        self.registry.register(self.collector)
        self._servers: list[asyncio.Server] = []
        self.udp = UDPServer(self.commands, self.counters, settings.udp_allow_all, self.engine)
        self.report.conns = lambda: (
            self.tcp.conns_lines(SWEEP_PERIOD)
            + self.udp.conns_lines(int(self.tcp.tick * SWEEP_PERIOD))
        )
        self._ticker: asyncio.TimerHandle | None = None
        self._stopped = asyncio.Event()
        self._save_on_stop = False
        self.warm: WarmRestart | None = None
        if settings.memory_file:
            budget = memory_budget or f"-m {self.store.capacity} bytes"
            self.warm = WarmRestart(
                snapshot_path(settings.memory_file, worker_index, workers),
                Identity(budget, settings.max_item_size, worker_index, workers),
                VERSION,
                started=self.report.started,
            )
            self.report.extra_general.append(self.warm.stats_fields)

    def set_memlimit(self, nbytes: int) -> None:
        """cache_memlimit: resize the store (evicting down to a smaller size at once)."""
        self.store.set_capacity(nbytes)
        for listener in self.memlimit_listeners:
            listener(nbytes)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        st = self.settings
        if self.warm is not None:
            # Before listening: a client (and a readiness probe) sees the restored cache or
            # nothing, never a cache still filling.
            self.warm.restore(self.store)
            self.report.started = self.warm.started
        if self.discovery is not None:
            self.discovery.poll()  # the first membership before the first client
        for listener in st.listeners:
            port = listener.port_for(st.port, self.worker_index)
            self.tcp.listen(listener.host, port, tls=self.tls if listener.tls else None)
            log.info("listening on %s:%d (TCP%s)", listener.host, port, ", TLS" * listener.tls)
        if st.admin_socket:
            path = worker_path(st.admin_socket, self.worker_index, self.workers)
            self.tcp.listen_admin(path)
            log.info("admin socket %s (version and stats)", path)
        if self.credentials is not None:
            log.info(
                "clients authenticate first (-Y %s, %d users)",
                st.auth_file,
                len(self.credentials.credentials.entries),
            )
        if self.engine is None:
            why = "--python-only" if st.python_only else "the C extension was not built"
            log.info("plain get/set served by the Python path (%s)", why)
        if st.udp_port:
            self.udp.listen(st.host, st.udp_port)
            log.info(
                "listening on %s:%d (UDP%s)",
                st.host,
                st.udp_port,
                ", all commands" if st.udp_allow_all else "",
            )
        if st.metrics_port:
            self._servers.append(
                await serve_metrics(self.registry, st.host, st.metrics_port, self._stats)
            )
            log.info("metrics on http://%s:%d/metrics", st.host, st.metrics_port)
        self._ticker = loop.call_later(SWEEP_PERIOD, self._tick)

    def _stats(self, worker: int, sub: str) -> bytes | None:
        """This worker's ``stats [sub]`` for the HTTP endpoint."""
        return self.report(sub.encode()) if worker == 0 else None

    def _tick(self) -> None:
        self.store.reclaim_expired(CRAWL_BUDGET)
        self.tcp.sweep(SWEEP_PERIOD)
        if self.discovery is not None:
            self.discovery.poll()  # a stat() a second; reads the file only when it changed
        if self.credentials is not None:
            self.credentials.poll()  # the same for the credentials file
        if self.tls is not None:
            self.tls.poll()  # and the certificates
        self._ticker = asyncio.get_running_loop().call_later(SWEEP_PERIOD, self._tick)

    def reload(self) -> None:
        """SIGHUP: read the credentials file again (as memcached) and the certificates."""
        if self.credentials is not None:
            self.credentials.reload()
        if self.tls is not None:
            self.tls.refresh()

    def stop(self, save: bool = False) -> None:
        """Stop serving; with ``save`` (and -e) write the warm-restart snapshot first."""
        self._save_on_stop = self._save_on_stop or save
        self._stopped.set()

    async def run_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        # SIGTERM (what the kubelet sends) and SIGUSR1 (memcached's graceful stop) keep the
        # cache with -e; SIGINT stops without saving, as memcached's normal exit does.
        loop.add_signal_handler(signal.SIGTERM, self.stop, True)
        loop.add_signal_handler(signal.SIGUSR1, self.stop, True)
        loop.add_signal_handler(signal.SIGINT, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await self._stopped.wait()
        await self.close()

    async def close(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()
        for server in self._servers:
            server.close()
        self.udp.close()
        self.tcp.close()
        for server in self._servers:
            await server.wait_closed()
        if self.warm is not None and self._save_on_stop:
            self.warm.save(self.store)
        log.info("stopped (pid %d)", os.getpid())


def _shutdown(workers: int, graceful: bool) -> None:
    """The shutdown command (-A): stop as SIGINT does, or with ``graceful`` as SIGUSR1 does
    (which keeps the cache with -e); with -t N the supervisor stops every worker."""
    sig = signal.SIGUSR1 if graceful else signal.SIGINT
    os.kill(os.getppid() if workers > 1 else os.getpid(), sig)
