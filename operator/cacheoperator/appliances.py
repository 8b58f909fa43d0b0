"""What each appliance says about its start: the CPUs and the memory limit it got, and what
its warm restart restored. The one place the operator talks to cache servers.

Appliances keep no API credentials, so nothing in them can write to the CacheCluster. They
report instead, to anyone who may talk to them, over the memcached protocol (see
docs/architecture.md): `stats settings` has `cpus`, `cpus_allowed`, `cpus_online`,
`memory_limit`, `memory_limit_source`; `stats` has `warm_restart`,
`warm_restart_restored_items` and `warm_restart_reason` (with -e). The operator asks both on
one connection to every worker of every ready pod, once per container: none of it changes
while a process lives. When the memcached port wants credentials or TLS the operator does not
hold (spec.auth, spec.tls), the same two replies are read over HTTP instead, from
`/stats/settings` and `/stats` on the pod's metrics port. The reports feed
`status.endpoints[]` (cpus, memoryLimit), the `Pinned` condition (pinning.py) and
`status.appliances` with its events (status.py).

The reads run on a few threads of their own, never inside a reconcile pass: a pass takes
what has been read so far and asks for what is missing. When the reads a pass asked for
are all in, the cluster gets one more pass (`notify`), which puts them into the status.
A read that fails is tried again later, less and less often.
"""

from __future__ import annotations

import heapq
import logging
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from cacheserver.cpus import parse_cpu_list

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 2.0  # seconds for one read: connect and reply together
MAX_REPLY = 1 << 20
RETRY_FIRST, RETRY_MOST = 5.0, 300.0  # seconds before a failed read is tried again


@dataclass(frozen=True)
class Restore:
    """How a cache came through its start (warm restart): one worker's, or a pod's with all
    its workers together (`pod_restore`)."""

    result: str  # restored, none (no snapshot), refused, unknown (no answer, or no -e)
    items: int = 0
    reason: str = ""  # why a snapshot was refused


UNKNOWN = Restore("unknown")


@dataclass(frozen=True)
class ApplianceReport:
    """What one worker process reported about itself."""

    cpus: frozenset[int]  # the CPUs it runs on now
    cpus_allowed: frozenset[int]  # its container's cpuset, at start
    cpus_online: frozenset[int] | None  # the machine's CPUs, if it could tell
    memory_limit: int | None = None  # bytes
    memory_limit_source: str | None = None
    restore: Restore = UNKNOWN  # unknown: it runs without warm restart


# What a pass gets per (pod, worker): a report, why it could not be read, or None (not yet).
Reading = ApplianceReport | str | None


def _stat_values(text: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(" ", 2)
        if len(parts) == 3 and parts[0] == "STAT":
            values[parts[1]] = parts[2].strip()
    return values


def parse_restore(text: str) -> Restore:
    """The warm restart in a `stats` reply: unknown when the server runs without it;
    ValueError if its count is not one."""
    values = _stat_values(text)
    if "warm_restart" not in values:
        return UNKNOWN
    items = values.get("warm_restart_restored_items", "0")
    if not items.isdigit():
        raise ValueError(f"warm_restart_restored_items {items!r} is not a count")
    reason = values.get("warm_restart_reason", "-")
    return Restore(values["warm_restart"], int(items), "" if reason == "-" else reason)


def parse_settings(text: str, stats: str = "") -> ApplianceReport:
    """The report in a `stats settings` reply (and the warm restart in a `stats` reply);
    ValueError if it is not one."""
    values = _stat_values(text)
    if "cpus" not in values or "cpus_allowed" not in values:
        raise ValueError("its stats settings name no cpus (a server older than this operator?)")
    online = values.get("cpus_online", "-")
    limit = values.get("memory_limit", "")
    return ApplianceReport(
        cpus=parse_cpu_list(values["cpus"]),
        cpus_allowed=parse_cpu_list(values["cpus_allowed"]),
        cpus_online=None if online == "-" else parse_cpu_list(online),
        memory_limit=int(limit) if limit.isdigit() else None,
        memory_limit_source=values.get("memory_limit_source") or None,
        restore=parse_restore(stats),
    )


def read_report(address: str, port: int, timeout: float = DEFAULT_TIMEOUT) -> ApplianceReport:
    """`stats settings` and `stats` from one worker, within `timeout` seconds in all."""
    deadline = time.monotonic() + timeout
    with socket.create_connection((address, port), timeout=timeout) as sock:
        settings = _ask(sock, b"stats settings\r\n", deadline, timeout)
        stats = _ask(sock, b"stats\r\n", deadline, timeout)
    return parse_settings(settings, stats)


def http_stats(address: str, port: int, worker: int, sub: str, timeout: float) -> str:
    """A worker's `stats [sub]` reply from the appliance's HTTP endpoint (the metrics port);
    OSError or ValueError when it cannot be had."""
    host = f"[{address}]" if ":" in address else address
    path = "/stats/settings" if sub == "settings" else "/stats"
    url = f"http://{host}:{port}{path}?worker={worker}"
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        body = reply.read(MAX_REPLY + 1)
    if len(body) > MAX_REPLY:
        raise ValueError("reply too long")
    return body.decode("utf-8", "replace")


def _ask(sock: socket.socket, command: bytes, deadline: float, timeout: float) -> str:
    """One command's reply (up to its END line), before `deadline`."""
    sock.sendall(command)
    data = b""
    while not data.endswith(b"END\r\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no full reply within {timeout:g} s")
        sock.settimeout(left)
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the end of the reply")
        data += chunk
        if len(data) > MAX_REPLY:
            raise ValueError("reply too long")
    return data.decode("utf-8", "replace")


def pod_restore(readings: Sequence[Reading]) -> Restore | None:
    """A pod's warm restart from its workers' readings: None until all of them are in;
    unknown if one could not be read or runs without warm restart; the counts added up,
    and one refused worker is news even when the others restored."""
    if not readings or any(r is None for r in readings):
        return None
    restores = [r.restore for r in readings if isinstance(r, ApplianceReport)]
    if len(restores) < len(readings) or any(r.result == "unknown" for r in restores):
        return UNKNOWN
    results = {r.result for r in restores}
    reasons = ", ".join(sorted({r.reason for r in restores if r.reason}))
    for result in ("refused", "restored", "none"):
        if result in results:
            return Restore(result, sum(r.items for r in restores), reasons)
    return UNKNOWN


def pod_restores(
    workers: Mapping[str, Sequence[int]], readings: Mapping[tuple[str, int], Reading]
) -> dict[str, Restore]:
    """`pod_restore` of each pod (`workers`: pod -> its workers) whose readings are all in."""
    out = {}
    for pod, indexes in workers.items():
        restore = pod_restore([readings.get((pod, w)) for w in indexes])
        if restore is not None:
            out[pod] = restore
    return out


@dataclass(frozen=True)
class Target:
    """One worker of one container instance: a new process is a new target."""

    namespace: str
    cluster: str
    pod: str
    instance: str  # pod uid and container id
    worker: int
    address: str
    port: int
    # With spec.auth or spec.tls: the metrics port, whose /stats/settings and /stats are read.
    http_port: int | None = None


def read_target(target: Target, timeout: float = DEFAULT_TIMEOUT) -> ApplianceReport:
    """`stats settings` and `stats` of a target, over the memcached protocol or over HTTP."""
    if target.http_port is None:
        return read_report(target.address, target.port, timeout)
    settings = http_stats(target.address, target.http_port, target.worker, "settings", timeout)
    stats = http_stats(target.address, target.http_port, target.worker, "", timeout)
    return parse_settings(settings, stats)


def pod_instance(pod: Mapping[str, Any]) -> str:
    meta = pod.get("metadata") or {}
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    containers = ",".join(str(s.get("containerID") or s.get("restartCount", 0)) for s in statuses)
    return f"{meta.get('uid', '')}/{containers}"


@dataclass
class _Entry:
    reading: Reading = None
    pending: bool = False
    failures: int = 0
    retry_at: float = 0.0


class ApplianceReports:
    """Reads reports in the background and hands passes what has arrived."""

    def __init__(
        self,
        notify: Callable[[str, str], None] = lambda namespace, cluster: None,
        read: Callable[[Target, float], ApplianceReport] = read_target,
        timeout: float = DEFAULT_TIMEOUT,
        threads: int = 4,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.notify = notify
        self._read = read
        self.timeout = timeout
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Target, _Entry] = {}
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="appliance-report")
        self._retries: list[tuple[float, str, str]] = []  # (when, namespace, cluster)
        self._wake = threading.Condition(self._lock)
        self._retrier: threading.Thread | None = None

    def readings(self, targets: Sequence[Target]) -> dict[tuple[str, int], Reading]:
        """What has been read of these targets, by (pod, worker); reads what is missing
        (and what failed long enough ago) in the background. Targets of the same cluster
        that are not listed any more are forgotten."""
        now = self._clock()
        out: dict[tuple[str, int], Reading] = {}
        start: list[Target] = []
        with self._lock:
            clusters = {(t.namespace, t.cluster) for t in targets}
            listed = set(targets)
            for old in [t for t in self._entries if (t.namespace, t.cluster) in clusters]:
                if old not in listed:
                    del self._entries[old]
            for target in targets:
                entry = self._entries.setdefault(target, _Entry())
                due = entry.reading is None or (
                    isinstance(entry.reading, str) and now >= entry.retry_at
                )
                if due and not entry.pending:
                    entry.pending = True
                    start.append(target)
                out[(target.pod, target.worker)] = entry.reading
        for target in start:
            self._executor.submit(self._probe, target)
        return out

    def forget(self, namespace: str, cluster: str) -> None:
        with self._lock:
            for target in [
                t for t in self._entries if (t.namespace, t.cluster) == (namespace, cluster)
            ]:
                del self._entries[target]

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _probe(self, target: Target) -> None:
        try:
            reading: Reading = self._read(target, self.timeout)
        except (OSError, ValueError) as exc:
            reading = f"cannot read {_where(target)}: {exc or type(exc).__name__}"
        except Exception as exc:  # a bug must not kill the thread pool's worker silently
            log.exception("reading %s/%s failed", target.namespace, target.pod)
            reading = f"cannot read {_where(target)}: {exc}"
        retry_at = None
        with self._lock:
            entry = self._entries.get(target)
            if entry is None:
                return  # forgotten meanwhile (pod gone, cluster deleted)
            entry.pending = False
            entry.reading = reading
            if isinstance(reading, str):
                entry.failures += 1
                delay = min(RETRY_MOST, RETRY_FIRST * 2 ** (entry.failures - 1))
                entry.retry_at = retry_at = self._clock() + delay
            else:
                entry.failures = 0
            # One more pass for the cluster once the last read it asked for is in.
            waiting = any(
                e.pending
                for t, e in self._entries.items()
                if (t.namespace, t.cluster) == (target.namespace, target.cluster)
            )
        if retry_at is not None:
            self._retry_later(retry_at, target.namespace, target.cluster)
        if not waiting:
            self._notify(target.namespace, target.cluster)

    def _notify(self, namespace: str, cluster: str) -> None:
        try:
            self.notify(namespace, cluster)
        except Exception as exc:  # the next event of the cluster tries again
            log.warning(
                "pass for %s/%s after appliance reports failed: %s", namespace, cluster, exc
            )

    def _retry_later(self, when: float, namespace: str, cluster: str) -> None:
        """A pass for the cluster at `when`, which reads again what failed (one thread waits
        for all retries)."""
        with self._wake:
            heapq.heappush(self._retries, (when, namespace, cluster))
            if self._retrier is None:
                self._retrier = threading.Thread(
                    target=self._run_retries, name="appliance-retry", daemon=True
                )
                self._retrier.start()
            self._wake.notify()

    def _run_retries(self) -> None:
        while True:
            with self._wake:
                while not self._retries or self._retries[0][0] > self._clock():
                    wait = self._retries[0][0] - self._clock() if self._retries else None
                    self._wake.wait(wait)
                _, namespace, cluster = heapq.heappop(self._retries)
            self._notify(namespace, cluster)


def _where(target: Target) -> str:
    if target.http_port is None:
        return f"{target.address}:{target.port}"
    return f"http://{target.address}:{target.http_port}/stats/settings?worker={target.worker}"


def targets_of(
    namespace: str,
    cluster: str,
    endpoints: Iterable[Any],
    pods: Iterable[Mapping[str, Any]],
    http_port: int | None = None,
) -> list[Target]:
    """A target per endpoint (ready pods' workers), tied to its pod's container instance;
    with ``http_port``, read over HTTP on it."""
    instances = {(p.get("metadata") or {}).get("name"): pod_instance(p) for p in pods}
    return [
        Target(
            namespace=namespace,
            cluster=cluster,
            pod=e.pod,
            instance=instances.get(e.pod, ""),
            worker=e.worker,
            address=e.address,
            port=e.port,
            http_port=http_port,
        )
        for e in endpoints
    ]
