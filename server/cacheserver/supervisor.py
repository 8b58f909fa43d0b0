"""Shard-per-core: ``-t N`` runs N worker processes, each pinned to one CPU of this process's
cpuset, serving its own port (port, port+1, ...) and its own share of the memory.

Keys are never split across processes behind one port: every worker is a separate endpoint
that clients hash keys across, like the appliances of a cluster. The parent only supervises
(signals, a worker that dies) and serves the metrics of all workers, gathered when scraped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

import uvloop

from cacheserver.config import Settings
from cacheserver.termination import record_fatal

if TYPE_CHECKING:
    from cacheserver.server import Worker

log = logging.getLogger("cacheserver")
# Runs a worker until it stops (the memory layer's shrinker goes along); default: run it alone.
Serve = Callable[["Worker"], Awaitable[None]]


def worker_settings(settings: Settings, index: int) -> Settings:
    """The settings of worker ``index``: its own ports, metrics served by the parent."""
    return replace(
        settings,
        port=settings.port + index,
        udp_port=settings.udp_port + index if settings.udp_port else 0,
        metrics_port=0,
        workers=1,
    )


def cpu_for(index: int) -> int | None:
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[index % len(cpus)] if cpus else None


def _run_child(
    settings: Settings, index: int, capacity: int, serve: Serve | None, budget: str | None
) -> None:
    """Body of a forked worker process; never returns."""
    from cacheserver.server import Worker

    code = 0
    try:
        allowed = frozenset(os.sched_getaffinity(0))
        if settings.pin:
            cpu = cpu_for(index)
            if cpu is not None:
                os.sched_setaffinity(0, {cpu})
                log.info("worker %d pinned to CPU %d", index, cpu)
        mine = worker_settings(settings, index)
        worker = Worker(
            mine,
            capacity=capacity,
            worker_index=index,
            cpus_allowed=allowed,
            workers=settings.workers,
            memory_budget=budget,
        )
        uvloop.run(serve(worker) if serve else worker.run_until_stopped())
    except OSError as err:
        log.error("worker %d cannot start: %s", index, err)
        record_fatal(settings.termination_log, f"worker {index} cannot start: {err}")
        code = 1
    except BaseException as exc:  # a crash must end this process, never fall back into the parent
        log.exception("worker %d crashed", index)
        record_fatal(
            settings.termination_log, f"worker {index} crashed: {type(exc).__name__}: {exc}"
        )
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def run_workers(
    settings: Settings,
    total_capacity: int,
    serve: Serve | None = None,
    budget: str | None = None,
) -> int:
    """Fork the workers, serve their aggregated metrics, and wait. Returns the exit code.
    ``budget``: the memory budget a warm-restart snapshot must share (app.memory_budget)."""
    count = settings.workers
    share = total_capacity // count
    private_dir = None
    if not settings.admin_socket:
        # The aggregated metrics read each worker's stats from its admin socket: give them
        # one in a directory only this user can enter.
        private_dir = tempfile.mkdtemp(prefix="cacheserver-")
        settings = replace(settings, admin_socket=os.path.join(private_dir, "admin"))
    children: dict[int, int] = {}
    for index in range(count):
        pid = os.fork()
        if pid == 0:
            _run_child(settings, index, share, serve, budget)
        children[pid] = index
    log.info(
        "started %d workers on ports %d-%d, %d bytes each",
        count,
        settings.port,
        settings.port + count - 1,
        share,
    )
    # With -e a worker writes its snapshot before it exits: give it the time that takes at a
    # slow SAVE_FLOOR bytes per second before it is killed (the kubelet's grace period is
    # the real bound; the operator sets it from the memory size).
    reap_after = REAP_TIMEOUT + (share / SAVE_FLOOR if settings.memory_file else 0.0)
    try:
        return uvloop.run(_supervise(settings, children, reap_after))
    finally:
        if private_dir is not None:
            shutil.rmtree(private_dir, ignore_errors=True)


REAP_TIMEOUT = 10.0  # seconds a worker has to exit after the signal to stop
SAVE_FLOOR = 100e6  # bytes per second


async def _supervise(
    settings: Settings, children: dict[int, int], reap_after: float = REAP_TIMEOUT
) -> int:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    # The signal that stopped the server goes on to the workers: SIGTERM and SIGUSR1 make a
    # worker with -e save its snapshot, SIGINT does not.
    stop_signal = [signal.SIGTERM]

    def stop(sig: signal.Signals) -> None:
        stop_signal[0] = sig
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        loop.add_signal_handler(sig, stop, sig)

    def forward(sig: signal.Signals) -> None:
        for pid in children:
            _signal(pid, sig)

    # SIGHUP reloads the credentials and certificates: each worker reads its own copy.
    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)
    metrics_server = None
    if settings.metrics_port:
        from cacheserver.metrics.aggregate import serve_aggregated_metrics

        metrics_server = await serve_aggregated_metrics(settings)
    exit_code = 0
    while children and not stopping.is_set():
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=0.5)
            continue
        index = children.pop(pid, None)
        if index is not None:
            # A shard that is gone loses its keys' home: end the whole server so the
            # supervisor above (the kubelet) restarts it, rather than limp on.
            log.error("worker %d (pid %d) exited with status %d", index, pid, status)
            # A worker that could say why has said it already; this is the fallback.
            record_fatal(settings.termination_log, f"worker {index} exited with status {status}")
            exit_code = 1
            stopping.set()
    for pid in children:
        _signal(pid, stop_signal[0])
    for pid in list(children):
        await _reap(pid, reap_after)
    if metrics_server is not None:
        metrics_server.close()
    return exit_code


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def _reap(pid: int, timeout: float = REAP_TIMEOUT) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        await asyncio.sleep(0.05)
    _signal(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_workers(Settings(workers=2), 64 << 20))
