"""One reconcile pass for one CacheCluster: read, build, apply, prune, observe, report.

No kopf in here: the handlers call `ClusterController.reconcile(namespace, name)` from
whichever event woke them (the cluster changed, or one of its pods or StatefulSets did),
which only queues the cluster; a few threads of the controller's own run the passes (see
`WorkQueue`). Each pass re-reads the cluster, so it never acts on an old spec or compares
against an old status; passes for the same cluster never overlap.
"""

from __future__ import annotations

import contextvars
import functools
import hashlib
import heapq
import itertools
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cacheoperator.appliances import ApplianceReports, pod_restores, targets_of
from cacheoperator.children import configmap, desired_objects
from cacheoperator.discovery import (
    discovery_endpoint,
    members,
    next_discovery,
    previous_discovery,
)
from cacheoperator.gate import GATE, NO_NODE, home_node, is_gated, release_patch
from cacheoperator.kube import CACHECLUSTERS, NODES, PODS, STATEFULSETS, Kube, KubeError
from cacheoperator.metrics import OperatorMetrics
from cacheoperator.models import CacheClusterSpec, Endpoint, InvalidSpec, parse_spec
from cacheoperator.naming import LABEL_CLUSTER, ClusterRef, selector_string
from cacheoperator.rollout import (
    Plan,
    deadline_seconds,
    needs_pods,
    plan_rollout,
    previous_rollout,
)
from cacheoperator.scheduling import host_ports
from cacheoperator.status import (
    Event,
    Observed,
    compute_status,
    endpoints,
    invalid_status,
    move_events,
    needs_host_port_pods,
    restore_events,
    transitions,
    unschedulable_message,
)

log = logging.getLogger(__name__)

# Node labels (zone, rack) hardly ever change, while passes run on every pod event: read
# each node at most once a minute.
NODE_LABELS_TTL = 60.0
# Pods that hold host ports, read (in all namespaces) only while a pod of some cluster
# waits for a port; passes of several stuck clusters within this time share one read.
HOST_PORT_PODS_TTL = 5.0
# A pod that could not be released for a passing reason (the API server busy or out of
# reach): its cluster gets another pass this many seconds later.
RELEASE_RETRY = 5.0
# Placement problems already posted as events, by (pod uid, reason): once each, not once
# per pass that retries. Forgotten wholesale past this many.
POSTED_PLACEMENT_PROBLEMS = 1000
# A pod being released, or released this recently (seconds), is not patched again: its own
# next events, and a pass that listed it before the patch landed, still show it gated.
RELEASED_MEMORY = 30.0
# Past this many remembered releases, the expired ones are dropped.
RELEASED_LIMIT = 1000
# Pods that are on a node and not finished: the ones whose host ports the scheduler counts.
ON_A_NODE = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
# Threads that run passes (each mostly waits for the API server), and the wait before a pass
# that met a passing API failure (a conflict, throttling, the server busy) runs again.
WORKERS = 8
RETRY_DELAY = 10.0
# A child object that the operator applied and that is the same in the next pass is not sent
# again for this long (seconds): StatefulSets are watched, and one changed by someone else
# (its generation moved) or deleted is applied again at once; the others, which are not
# watched, at the first pass after this time.
APPLY_REFRESH = 300.0


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """What a pass did: `result` is ok, invalid or error (a refused child object)."""

    result: str
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    status_written: bool = False
    recheck_in: float | None = None  # seconds until a rollout's deadline passes


class WorkQueue:
    """Keys (clusters) waiting for a pass, taken by a few threads.

    A key waits at most once: the events that arrive while it waits fold into its one pass,
    so a burst of pod events costs one pass, and nothing of the events is kept. Passes of a
    key never overlap: a key added during its pass waits until that pass is `done`, then
    once more. `add(key, delay)` queues it later (a retry).

    Keys that have had a pass wait in a lane of their own, and the two lanes take turns: a
    burst of new clusters (or the start of the operator, which passes over every cluster)
    does not hold up the status of clusters already running, and neither starves the other.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._lanes: tuple[deque[Hashable], deque[Hashable]] = (deque(), deque())  # new, seen
        self._turn = 1  # the lane that goes first when both have keys
        self._seen: set[Hashable] = set()  # keys that have had a pass
        self._waiting: set[Hashable] = set()  # in a lane
        self._running: set[Hashable] = set()
        self._again: set[Hashable] = set()  # added while running
        self._later: list[tuple[float, int, Hashable]] = []  # heap of (when, seq, key)
        self._seq = itertools.count()

    def add(self, key: Hashable, delay: float = 0.0) -> None:
        with self._cond:
            if delay > 0:
                heapq.heappush(self._later, (time.monotonic() + delay, next(self._seq), key))
                self._cond.notify()  # a waiting `get` may have to wake up sooner
            else:
                self._add_now(key)

    def _add_now(self, key: Hashable) -> None:
        if key in self._running:
            self._again.add(key)
        elif key not in self._waiting:
            self._waiting.add(key)
            self._lanes[key in self._seen].append(key)
            self._cond.notify()

    def _next(self) -> Hashable | None:
        new, seen = self._lanes
        if new and seen:
            lane, self._turn = self._lanes[self._turn], 1 - self._turn
        else:
            lane = new or seen
        return lane.popleft() if lane else None

    def get(self, timeout: float | None = None) -> Hashable | None:
        """The next key, whose pass runs from now until `done(key)`; None after `timeout`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                while self._later and self._later[0][0] <= now:
                    self._add_now(heapq.heappop(self._later)[2])
                key = self._next()
                if key is not None:
                    self._waiting.discard(key)
                    self._running.add(key)
                    return key
                if deadline is not None and now >= deadline:
                    return None
                soonest = self._later[0][0] if self._later else None
                until = [t for t in (deadline, soonest) if t is not None]
                self._cond.wait(min(until) - now if until else None)

    def done(self, key: Hashable) -> None:
        with self._cond:
            self._running.discard(key)
            self._seen.add(key)
            if key in self._again:
                self._again.discard(key)
                self._add_now(key)

    def forget(self, key: Hashable) -> None:
        """The key is gone (a deleted cluster): a new one of that name is new again."""
        with self._cond:
            self._seen.discard(key)

    def __len__(self) -> int:
        """Keys waiting now (not those running, nor those added for later)."""
        with self._cond:
            return sum(len(lane) for lane in self._lanes)


def digest(obj: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Applied:
    """What the operator last sent for one child object and what the API server made of it."""

    digest: str
    uid: str | None
    generation: int | None
    until: float  # monotonic time after which it is sent again anyway


class AppliedObjects:
    """The child objects this operator applied, so that a pass sends only what changed: a
    pass over an unchanged cluster sends nothing (the API server would keep every
    resourceVersion anyway, but each apply is a round trip and a merge on both sides)."""

    def __init__(self, refresh: float = APPLY_REFRESH, clock: Callable[[], float] = time.monotonic):
        self.refresh = refresh
        self._clock = clock
        self._lock = threading.Lock()
        self._by_cluster: dict[tuple[str, str], dict[tuple[str, str], Applied]] = {}

    @staticmethod
    def _keys(ref: ClusterRef, obj: Mapping[str, Any]) -> tuple[tuple[str, str], tuple[str, str]]:
        return (ref.namespace, ref.name), (obj["kind"], obj["metadata"]["name"])

    def needed(
        self,
        ref: ClusterRef,
        obj: Mapping[str, Any],
        live: Mapping[str, Any] | None = None,
        watched: bool = False,
    ) -> bool:
        """Whether `obj` must be applied: it is new, it changed, its last apply is older than
        `refresh`, or (`watched`: the kinds the operator lists, with `live` the object as
        listed, None if it is not there) it was deleted, replaced or its spec was changed."""
        cluster, key = self._keys(ref, obj)
        with self._lock:
            last = self._by_cluster.get(cluster, {}).get(key)
        if last is None or self._clock() >= last.until or last.digest != digest(obj):
            return True
        if watched:
            meta = (live or {}).get("metadata") or {}
            return (meta.get("uid"), meta.get("generation")) != (last.uid, last.generation)
        return False

    def record(self, ref: ClusterRef, obj: Mapping[str, Any], result: Mapping[str, Any]) -> None:
        """`obj` was applied; `result` is the API server's answer."""
        cluster, key = self._keys(ref, obj)
        meta = result.get("metadata") or {}
        applied = Applied(
            digest(obj), meta.get("uid"), meta.get("generation"), self._clock() + self.refresh
        )
        with self._lock:
            self._by_cluster.setdefault(cluster, {})[key] = applied

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._by_cluster.pop((namespace, name), None)


def _endpoints(status: Mapping[str, Any]) -> list[Endpoint]:
    return [Endpoint.model_validate(e) for e in status.get("endpoints") or []]


def _scope_note(scope: str | None) -> str:
    if scope is None:
        return ""
    return f"the operator may list pods in namespace {scope} only"


def owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


class ClusterController:
    """Reconciles CacheClusters through a `Kube`; safe to call from many threads."""

    def __init__(
        self,
        kube: Kube,
        default_image: str,
        post_event: Callable[[Mapping[str, Any], Event], None] = lambda body, event: None,
        metrics: OperatorMetrics | None = None,
        clock: Callable[[], str] = utc_now,
        reports: ApplianceReports | None = None,
        workers: int = WORKERS,
    ):
        """`reports` reads what the appliances say about their CPUs, memory and warm restart
        (None: the endpoints go without, Pinned stays Unknown and status.appliances empty);
        `workers` threads run the passes."""
        self.kube = kube
        self.reports = reports
        self.default_image = default_image
        self.post_event = post_event
        self.metrics = metrics or OperatorMetrics()
        self.clock = clock
        self.queue = WorkQueue()
        self.applied = AppliedObjects()
        self.workers = workers
        self._threads: list[threading.Thread] = []
        self._nodes: dict[str, tuple[float, dict[str, str]]] = {}
        self._host_port_pods: dict[str | None, tuple[float, list[dict[str, Any]]]] = {}
        self._cache_lock = threading.Lock()
        self._posted: set[tuple[str, str]] = set()
        self._released: dict[str, float] = {}  # pod uid -> until when it counts as released
        # Each cluster's object as its watch events last showed it: what a release needs
        # (status.lastNodes) without a read per pod.
        self._clusters: dict[tuple[str, str], Mapping[str, Any]] = {}
        # Clusters with a pass queued for when a rollout's deadline passes: the soonest.
        self._deadlines: dict[tuple[str, str], float] = {}

    def seen(self, body: Mapping[str, Any]) -> None:
        """A CacheCluster as a watch event shows it (kept for releases; see `release`)."""
        meta = body["metadata"]
        with self._cache_lock:
            self._clusters[(meta["namespace"], meta["name"])] = body

    def reconcile(self, namespace: str, name: str) -> None:
        """Queue a pass over the cluster; it runs soon on one of the controller's threads."""
        self._start()
        self.queue.add((namespace, name))

    def _start(self) -> None:
        with self._cache_lock:
            if self._threads:
                return
            for i in range(self.workers):
                # Each thread runs in a copy of the context of the first caller: kopf's, from a
                # handler, where kopf.event finds the queue that posts Kubernetes Events.
                context = contextvars.copy_context()
                thread = threading.Thread(
                    target=context.run, args=(self._work,), name=f"reconcile-{i}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    def _work(self) -> None:
        while True:
            namespace, name = self.queue.get()
            try:
                self._pass(namespace, name)
            except KubeError as exc:
                if exc.retryable:
                    log.warning("%s/%s: %s; again in %.0f s", namespace, name, exc, RETRY_DELAY)
                    self.queue.add((namespace, name), RETRY_DELAY)
                else:
                    # e.g. forbidden: retrying will not help until someone fixes RBAC; the
                    # next change to the cluster or its pods tries again.
                    log.warning("%s/%s: %s", namespace, name, exc)
            except Exception:
                log.exception(
                    "%s/%s: the pass failed; again in %.0f s", namespace, name, RETRY_DELAY
                )
                self.queue.add((namespace, name), RETRY_DELAY)
            finally:
                self.queue.done((namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        with self._cache_lock:
            self._clusters.pop((namespace, name), None)
            self._deadlines.pop((namespace, name), None)
        self.metrics.forget(namespace, name)
        self.queue.forget((namespace, name))
        self.applied.forget(namespace, name)
        if self.reports is not None:
            self.reports.forget(namespace, name)

    def _pass_in(self, namespace: str, name: str, seconds: float) -> None:
        """One more pass for the cluster in `seconds` (a rollout's deadline): kopf has no
        timers without finalizers, and a stuck step may send no events. Queued once per
        deadline: a pass that asks for the same or a later one adds nothing."""
        key = (namespace, name)
        now = time.monotonic()
        when = now + seconds
        with self._cache_lock:
            due = self._deadlines.get(key)
            if due is not None and now < due <= when:
                return
            self._deadlines[key] = when
        self._start()
        self.queue.add(key, seconds)

    def release(self, pod: Mapping[str, Any], cluster: Mapping[str, Any] | None = None) -> bool:
        """Take the placement gate off a gated pod (gate.py), preferring the node where the
        pod of its name last ran ready; True if this call released it. `cluster`: its
        CacheCluster as just read, else as its last watch event showed it (`seen`), else
        read here. One patch (and that read, if it is needed), two patches when the API
        server refuses the preference and the pod goes without it. A pod being released or
        just released (RELEASED_MEMORY) is left alone. A pod
        that cannot be released is logged and posted, and its cluster gets another pass
        (which releases what it finds gated) after RELEASE_RETRY seconds when the failure
        may pass."""
        if not is_gated(pod):
            return False
        meta = pod["metadata"]
        namespace = meta["namespace"]
        cluster_name = (meta.get("labels") or {}).get(LABEL_CLUSTER, "")
        uid = str(meta.get("uid") or "")
        now = time.monotonic()
        with self._cache_lock:
            if uid and self._released.get(uid, 0.0) > now:
                return False
            if len(self._released) >= RELEASED_LIMIT:
                self._released = {k: t for k, t in self._released.items() if t > now}
            if uid:
                self._released[uid] = now + RELEASED_MEMORY
            if cluster is None:
                cluster = self._clusters.get((namespace, cluster_name))
        released = self._release(pod, cluster)
        if not released and uid:
            with self._cache_lock:
                self._released.pop(uid, None)
        return released

    def _release(self, pod: Mapping[str, Any], cluster: Mapping[str, Any] | None) -> bool:
        meta = pod["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        cluster_name = (meta.get("labels") or {}).get(LABEL_CLUSTER, "")
        problem = ""
        if cluster is None:
            try:
                cluster = self.kube.get(CACHECLUSTERS, namespace, cluster_name)
            except KubeError as exc:
                problem = f"cannot read CacheCluster {cluster_name}: {exc}"
        node = home_node(cluster.get("status"), name) if cluster else None
        # Where its latest snapshot is, for its init container: unsaid without the cluster.
        snapshot_node = (node or NO_NODE) if cluster else None
        try:
            if node is not None:
                try:
                    self.kube.patch(PODS, namespace, name, release_patch(pod, node, snapshot_node))
                    log.info("%s/%s: released, to go back to node %s", namespace, name, node)
                    return True
                except KubeError as exc:
                    if exc.status == 404 or exc.retryable:
                        raise
                    # Refused (422): the pod as the API server has it takes no such term.
                    problem = f"the preference for node {node} was refused: {exc}"
            self.kube.patch(PODS, namespace, name, release_patch(pod, None, snapshot_node))
        except KubeError as exc:
            if exc.status == 404:  # gone meanwhile
                return False
            self._placement_problem(
                pod,
                cluster,
                "GateNotRemoved",
                f"{name} stays Pending: the operator cannot remove its scheduling gate {GATE}: "
                f"{exc}",
            )
            if exc.retryable and cluster_name:
                self._pass_later(namespace, cluster_name)
            return False
        if problem:
            self._placement_problem(
                pod,
                cluster,
                "NodeNotPreferred",
                f"{name} was released without a preference for the node of its snapshot: {problem}",
            )
        else:
            log.info("%s/%s: released (no node known for it)", namespace, name)
        return True

    def _pass_later(self, namespace: str, name: str) -> None:
        """One more pass for the cluster in RELEASE_RETRY seconds (the work queue folds it
        into any pass already due; a pass that fails for a passing reason is retried there)."""
        self._start()
        self.queue.add((namespace, name), RELEASE_RETRY)

    def release_gated(self, pods: Sequence[Mapping[str, Any]], cluster: Mapping[str, Any]) -> None:
        """Release the gated pods a pass sees. Each pod's own event releases it as a rule;
        this catches one whose release failed (an API error), or raced with a pass."""
        for pod in pods:
            if is_gated(pod):
                self.release(pod, cluster)

    def _placement_problem(
        self, pod: Mapping[str, Any], cluster: Mapping[str, Any] | None, reason: str, message: str
    ) -> None:
        """Log it, and post it once per pod: on the CacheCluster, or the pod if that is
        unreadable."""
        meta = pod["metadata"]
        log.warning("%s/%s: %s", meta["namespace"], meta["name"], message)
        key = (str(meta.get("uid") or meta["name"]), reason)
        with self._cache_lock:
            if key in self._posted:
                return
            if len(self._posted) >= POSTED_PLACEMENT_PROBLEMS:
                self._posted.clear()
            self._posted.add(key)
        # (Listed pods come without their kind, which an event's object needs.)
        target = cluster or {"apiVersion": "v1", "kind": "Pod", **pod}
        try:
            self.post_event(target, Event("Warning", reason, message))
        except Exception as exc:  # an event is worth less than the pass that posts it
            log.warning("cannot post event %s: %s", reason, exc)

    def _apply(
        self,
        ref: ClusterRef,
        obj: dict[str, Any],
        live: Mapping[str, Any] | None = None,
        watched: bool = False,
    ) -> dict[str, Any] | None:
        """Server-side apply of `obj` unless this operator sent the same already (see
        `AppliedObjects`); the API server's answer, or None when nothing was sent."""
        if not self.applied.needed(ref, obj, live, watched):
            return None
        result = self.kube.apply(obj)
        self.applied.record(ref, obj, result)
        return result

    def _pass(self, namespace: str, name: str) -> Outcome | None:
        body = self.kube.get(CACHECLUSTERS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            # Gone or going: the garbage collector removes the children.
            self.applied.forget(namespace, name)
            return None
        started = time.monotonic()
        try:
            outcome = self.reconcile_body(body)
        except Exception:
            self.metrics.observe_reconcile("error", time.monotonic() - started)
            raise
        self.metrics.observe_reconcile(outcome.result, time.monotonic() - started)
        self.metrics.set_phase(namespace, name, outcome.status.get("phase", "Unknown"))
        self.metrics.set_cluster(namespace, name, outcome.status)
        if outcome.recheck_in is not None:
            self._pass_in(namespace, name, outcome.recheck_in + 1.0)
        for event in outcome.events:
            self.post_event(body, event)
        return outcome

    def reconcile_body(self, body: Mapping[str, Any]) -> Outcome:
        """One pass over a freshly read CacheCluster object."""
        meta = body["metadata"]
        ref = ClusterRef(meta["name"], meta["namespace"], meta["uid"])
        generation = int(meta.get("generation") or 0)
        previous = body.get("status") or {}
        published = previous_discovery(previous)  # the membership the appliances serve
        now = self.clock()
        try:
            spec = parse_spec(ref.name, body.get("spec"))
        except InvalidSpec as exc:
            # Leave the running pods alone: a typo in an edit must not take the cache down.
            log.warning("%s/%s: invalid spec: %s", ref.namespace, ref.name, exc)
            observed = self.observe(ref)
            self.release_gated(observed.pods, body)
            status = invalid_status(
                cluster=ref.name,
                generation=generation,
                problems=exc.problems,
                observed=observed,
                previous=previous,
                now=now,
                discovery=published,
            )
            return self._report(ref, "invalid", previous, status)

        endpoint = discovery_endpoint(ref, spec)
        if published is None:
            # A new cluster (or one from before auto discovery): its pods mount the
            # membership, so publish the first one, empty, before they exist.
            first = next_discovery(None, [], endpoint, now)
            self._apply(ref, configmap(ref, spec, _endpoints(previous), first))
        apply_error = None
        # With auth or TLS the memcached port wants what the operator does not hold: the
        # appliances' reports are read from /stats on their metrics port instead.
        stats_port = spec.metrics_port if spec.secured else None
        plan = Plan()
        statefulsets = self.statefulsets(ref)
        # Listed once per pass: by the rollout's plan when something rolls, else by observe.
        pods = functools.cache(
            lambda: self.kube.list(PODS, ref.namespace, selector_string(ref.name))
        )
        try:
            plan = self.apply_children(ref, spec, statefulsets, previous, now, stats_port, pods)
        except KubeError as exc:
            if exc.retryable:
                raise
            apply_error = str(exc)  # e.g. a nodeSelector key the API server rejects
        observed = self.observe(ref, statefulsets, stats_port, pods())
        self.release_gated(observed.pods, body)
        discovery = published
        if apply_error is None:
            nodes = members(ref, spec, observed.pods, published.nodes if published else ())
            discovery = next_discovery(published, nodes, endpoint, now)
        status = compute_status(
            cluster=ref.name,
            generation=generation,
            spec=spec,
            observed=observed,
            previous=previous,
            now=now,
            apply_error=apply_error,
            discovery=discovery,
            held=plan.held,
            rollout=plan.status(spec, observed.statefulsets, observed.pods),
        )
        if apply_error is None:
            # Last, so that it lists the endpoints this very pass observed. The status (the
            # operator's memory of the version) is written after it, so a version is never
            # recorded that the appliances were not given.
            self._apply(ref, configmap(ref, spec, _endpoints(status), discovery))
        outcome = self._report(ref, "error" if apply_error else "ok", previous, status)
        outcome.events += plan.events
        outcome.recheck_in = plan.recheck_in
        return outcome

    def statefulsets(self, ref: ClusterRef) -> list[dict[str, Any]]:
        """The cluster's StatefulSets as the API server has them now."""
        listed = self.kube.list(STATEFULSETS, ref.namespace, selector_string(ref.name))
        return [s for s in listed if owned_by(s, ref.uid)]

    def apply_children(
        self,
        ref: ClusterRef,
        spec: CacheClusterSpec,
        existing: list[dict[str, Any]],
        previous: Mapping[str, Any] | None = None,
        now: str = "",
        stats_port: int | None = None,
        list_pods: Callable[[], list[dict[str, Any]]] | None = None,
    ) -> Plan:
        """Apply what the spec wants and what changed since this operator last applied it;
        returns the rollout's plan: the StatefulSets whose new template waits for another's
        rollout (name -> what it waits for), and where the rollout is (`previous`: the
        status before this pass). `existing` are the cluster's StatefulSets as listed
        before; each one applied is replaced there by the API server's answer, so it stays
        current. `list_pods`: how this pass lists the cluster's pods (read here if None)."""
        desired = desired_objects(ref, spec, self.default_image)
        wanted_sets = [o for o in desired if o["kind"] == "StatefulSet"]
        pods: list[dict[str, Any]] = []
        restores = None
        if needs_pods(wanted_sets, existing):  # only while something rolls
            pods = (
                list_pods()
                if list_pods
                else self.kube.list(PODS, ref.namespace, selector_string(ref.name))
            )
            if spec.warm_restart.enabled and self.reports is not None:
                # The reports in so far (the rest are read in the background).
                ready = endpoints(pods, {})
                targets = targets_of(ref.namespace, ref.name, ready, pods, stats_port)
                workers: dict[str, list[int]] = {}
                for e in ready:
                    workers.setdefault(e.pod, []).append(e.worker)
                restores = pod_restores(workers, self.reports.readings(targets))
        plan = plan_rollout(
            wanted_sets,
            existing,
            pods=pods,
            restores=restores,
            previous=previous_rollout(previous),
            now=now,
            deadline=deadline_seconds(spec),
        )
        held = plan.held
        listed = {s["metadata"]["name"]: i for i, s in enumerate(existing)}
        for obj in desired:
            name = obj["metadata"]["name"]
            if obj["kind"] == "ConfigMap" or name in held:
                continue  # (only StatefulSets are ever held)
            if obj["kind"] != "StatefulSet":
                self._apply(ref, obj)
                continue
            index = listed.get(name)
            result = self._apply(ref, obj, None if index is None else existing[index], watched=True)
            if result and index is None:
                existing.append(result)
            elif result and index is not None:
                existing[index] = result
        if held:
            log.info(
                "%s/%s: StatefulSet(s) %s wait for %s",
                ref.namespace,
                ref.name,
                ", ".join(sorted(held)),
                next(iter(held.values())),
            )
        wanted = {o["metadata"]["name"] for o in wanted_sets}
        for sts in existing:
            sts_meta = sts["metadata"]
            # Partitions that no longer exist, or the single set after a strategy change.
            if sts_meta["name"] not in wanted:
                log.info(
                    "%s/%s: removing StatefulSet %s", ref.namespace, ref.name, sts_meta["name"]
                )
                self.kube.delete(STATEFULSETS, ref.namespace, sts_meta["name"], sts_meta["uid"])
        return plan

    def observe(
        self,
        ref: ClusterRef,
        statefulsets: list[dict[str, Any]] | None = None,
        stats_port: int | None = None,
        pods: list[dict[str, Any]] | None = None,
    ) -> Observed:
        """What exists of the cluster; `statefulsets` and `pods` if this pass has them
        already. ``stats_port``: where the appliances' stats are read over HTTP (None: over
        the memcached protocol on their own ports)."""
        if statefulsets is None:
            statefulsets = self.statefulsets(ref)
        if pods is None:
            pods = self.kube.list(PODS, ref.namespace, selector_string(ref.name))
        holders: list[dict[str, Any]] = []
        note = ""
        if needs_host_port_pods(pods):
            # Only the pods that share a port with a stuck one matter (and their nodes).
            wanted = frozenset().union(*(host_ports(p) for p in pods if unschedulable_message(p)))
            listed, note = self.host_port_pods(ref.namespace)
            holders = [p for p in listed if host_ports(p) & wanted]
        readings = {}
        if self.reports is not None:
            # What has been read so far; the rest is read in the background (never here).
            targets = targets_of(ref.namespace, ref.name, endpoints(pods, {}), pods, stats_port)
            readings = self.reports.readings(targets)
        return Observed(
            statefulsets=statefulsets,
            pods=pods,
            node_labels=self._node_labels([*pods, *holders]),
            host_port_pods=holders,
            host_port_note=note,
            readings=readings,
        )

    def host_port_pods(self, namespace: str) -> tuple[list[dict[str, Any]], str]:
        """Pods on nodes that declare host ports: in every namespace if the operator may list
        them there, else in `namespace`, with a note saying so."""
        now = time.monotonic()
        for scope in (None, namespace):
            with self._cache_lock:
                cached = self._host_port_pods.get(scope)
            if cached and cached[0] > now:
                return cached[1], _scope_note(scope)
        try:
            scope, pods = None, self.kube.list(PODS, None, field_selector=ON_A_NODE)
        except KubeError as exc:
            if exc.status != 403:
                raise
            scope, pods = namespace, self.kube.list(PODS, namespace, field_selector=ON_A_NODE)
        found = [p for p in pods if host_ports(p)]
        with self._cache_lock:
            self._host_port_pods[scope] = (now + HOST_PORT_PODS_TTL, found)
        return found, _scope_note(scope)

    def _node_labels(self, pods: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
        labels: dict[str, dict[str, str]] = {}
        now = time.monotonic()
        for node_name in sorted({(p.get("spec") or {}).get("nodeName") for p in pods} - {None}):
            cached = self._nodes.get(node_name)
            if cached and cached[0] > now:
                labels[node_name] = cached[1]
                continue
            try:
                node = self.kube.get(NODES, None, node_name)
            except KubeError as exc:
                # Without read access to nodes the endpoints just lack zone and rack.
                log.debug("cannot read node %s: %s", node_name, exc)
                continue
            if node:
                labels[node_name] = dict((node.get("metadata") or {}).get("labels") or {})
                self._nodes[node_name] = (now + NODE_LABELS_TTL, labels[node_name])
        return labels

    def _report(
        self, ref: ClusterRef, result: str, previous: Mapping[str, Any], status: dict[str, Any]
    ) -> Outcome:
        events = (
            transitions(previous, status)
            + move_events(previous, status)
            + restore_events(previous, status)
        )
        outcome = Outcome(result=result, status=status, events=events)
        if status != previous:
            self.kube.patch_status(CACHECLUSTERS, ref.namespace, ref.name, status)
            outcome.status_written = True
        return outcome
