"""One reconcile pass for one CacheCluster: read, build, apply, prune, observe, report.

No kopf in here: the handlers call `ClusterController.reconcile(namespace, name)` from
whichever event woke them (the cluster changed, or one of its pods or StatefulSets did).
Each pass re-reads the cluster, so it never acts on an old spec or compares against an
old status; passes for the same cluster never overlap (see `Coalescer`).
"""

from __future__ import annotations

import logging
import threading
import time
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
# Pods that are on a node and not finished: the ones whose host ports the scheduler counts.
ON_A_NODE = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"


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


class Coalescer:
    """Runs at most one pass per key at a time; calls that arrive meanwhile fold into one
    more pass after it, so a burst of pod events costs two passes, not one per event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._dirty: dict[Hashable, bool] = {}  # key present = a pass is running

    def run(self, key: Hashable, fn: Callable[[], Any]) -> bool:
        """True if this call ran the pass(es), False if it left them to a running one."""
        with self._lock:
            if key in self._dirty:
                self._dirty[key] = True
                return False
            self._dirty[key] = False
        try:
            while True:
                fn()
                with self._lock:
                    if not self._dirty[key]:
                        del self._dirty[key]
                        return True
                    self._dirty[key] = False
        except BaseException:
            with self._lock:
                self._dirty.pop(key, None)
            raise


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
    ):
        """`reports` reads what the appliances say about their CPUs, memory and warm restart
        (None: the endpoints go without, Pinned stays Unknown and status.appliances empty)."""
        self.kube = kube
        self.reports = reports
        self.default_image = default_image
        self.post_event = post_event
        self.metrics = metrics or OperatorMetrics()
        self.clock = clock
        self.coalescer = Coalescer()
        self._nodes: dict[str, tuple[float, dict[str, str]]] = {}
        self._host_port_pods: dict[str | None, tuple[float, list[dict[str, Any]]]] = {}
        self._cache_lock = threading.Lock()
        self._posted: set[tuple[str, str]] = set()
        self._retrying: set[tuple[str, str]] = set()  # clusters with a pass due (_pass_later)
        # Clusters with a pass due when a rollout's deadline passes: (when, timer).
        self._deadlines: dict[tuple[str, str], tuple[float, threading.Timer]] = {}

    def reconcile(self, namespace: str, name: str) -> None:
        self.coalescer.run((namespace, name), lambda: self._pass(namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        self.metrics.forget(namespace, name)
        if self.reports is not None:
            self.reports.forget(namespace, name)
        with self._cache_lock:
            due = self._deadlines.pop((namespace, name), None)
        if due is not None:
            due[1].cancel()

    def _pass_in(self, namespace: str, name: str, seconds: float) -> None:
        """One more pass for the cluster in `seconds` (a rollout's deadline): kopf has no
        timers without finalizers, and a stuck step may send no events. One timer per
        cluster, the soonest."""
        key = (namespace, name)
        when = time.monotonic() + seconds
        with self._cache_lock:
            due = self._deadlines.get(key)
            if due is not None and due[0] <= when and due[1].is_alive():
                return
            if due is not None:
                due[1].cancel()

            def run() -> None:
                with self._cache_lock:
                    if self._deadlines.get(key, (0, None))[1] is timer:
                        del self._deadlines[key]
                try:
                    self.reconcile(namespace, name)
                except Exception as exc:
                    log.warning("pass for %s/%s failed: %s", namespace, name, exc)
                    if not isinstance(exc, KubeError) or exc.retryable:
                        self._pass_later(namespace, name)

            timer = threading.Timer(seconds, run)
            timer.daemon = True
            self._deadlines[key] = (when, timer)
        timer.start()

    def release(self, pod: Mapping[str, Any], cluster: Mapping[str, Any] | None = None) -> bool:
        """Take the placement gate off a gated pod (gate.py), preferring the node where the
        pod of its name last ran ready; True if this call released it. `cluster`: its
        CacheCluster as just read, else read here. Two API calls (the read and one patch),
        three when the API server refuses the preference and the pod goes without it. A pod
        that cannot be released is logged and posted, and its cluster gets another pass
        (which releases what it finds gated) after RELEASE_RETRY seconds when the failure
        may pass."""
        if not is_gated(pod):
            return False
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
        """One more pass for the cluster in RELEASE_RETRY seconds (one waiting at a time),
        and again while that pass fails for a reason that may pass."""
        key = (namespace, name)
        with self._cache_lock:
            if key in self._retrying:
                return
            self._retrying.add(key)

        def run() -> None:
            with self._cache_lock:
                self._retrying.discard(key)
            try:
                self.reconcile(namespace, name)
            except Exception as exc:
                log.warning("pass for %s/%s failed: %s", namespace, name, exc)
                if not isinstance(exc, KubeError) or exc.retryable:
                    self._pass_later(namespace, name)

        timer = threading.Timer(RELEASE_RETRY, run)
        timer.daemon = True
        timer.start()

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

    def _pass(self, namespace: str, name: str) -> Outcome | None:
        body = self.kube.get(CACHECLUSTERS, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None  # gone or going: the garbage collector removes the children
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
            self.kube.apply(configmap(ref, spec, _endpoints(previous), first))
        apply_error = None
        # With auth or TLS the memcached port wants what the operator does not hold: the
        # appliances' reports are read from /stats on their metrics port instead.
        stats_port = spec.metrics_port if spec.secured else None
        plan = Plan()
        try:
            plan = self.apply_children(ref, spec, previous, now, stats_port)
        except KubeError as exc:
            if exc.retryable:
                raise
            apply_error = str(exc)  # e.g. a nodeSelector key the API server rejects
        observed = self.observe(ref, stats_port)
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
            self.kube.apply(configmap(ref, spec, _endpoints(status), discovery))
        outcome = self._report(ref, "error" if apply_error else "ok", previous, status)
        outcome.events += plan.events
        outcome.recheck_in = plan.recheck_in
        return outcome

    def apply_children(
        self,
        ref: ClusterRef,
        spec: CacheClusterSpec,
        previous: Mapping[str, Any] | None = None,
        now: str = "",
        stats_port: int | None = None,
    ) -> Plan:
        """Apply what the spec wants; returns the rollout's plan: the StatefulSets whose new
        template waits for another's rollout (name -> what it waits for), and where the
        rollout is (`previous`: the status before this pass)."""
        desired = desired_objects(ref, spec, self.default_image)
        existing = [
            s
            for s in self.kube.list(STATEFULSETS, ref.namespace, selector_string(ref.name))
            if owned_by(s, ref.uid)
        ]
        wanted_sets = [o for o in desired if o["kind"] == "StatefulSet"]
        pods: list[dict[str, Any]] = []
        restores = None
        if needs_pods(wanted_sets, existing):  # only while something rolls
            pods = self.kube.list(PODS, ref.namespace, selector_string(ref.name))
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
        for obj in desired:
            if obj["kind"] == "ConfigMap" or obj["metadata"]["name"] in held:
                continue  # (only StatefulSets are ever held)
            self.kube.apply(obj)
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

    def observe(self, ref: ClusterRef, stats_port: int | None = None) -> Observed:
        """``stats_port``: where the appliances' stats are read over HTTP (None: over the
        memcached protocol on their own ports)."""
        selector = selector_string(ref.name)
        statefulsets = [
            s for s in self.kube.list(STATEFULSETS, ref.namespace, selector) if owned_by(s, ref.uid)
        ]
        pods = self.kube.list(PODS, ref.namespace, selector)
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
