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
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from cacheoperator.appliance import UNKNOWN, Restore, read_restore
from cacheoperator.appliances import ApplianceReports, targets_of
from cacheoperator.children import configmap, desired_objects
from cacheoperator.discovery import (
    discovery_endpoint,
    members,
    next_discovery,
    previous_discovery,
)
from cacheoperator.kube import CACHECLUSTERS, NODES, PODS, STATEFULSETS, Kube, KubeError
from cacheoperator.metrics import OperatorMetrics
from cacheoperator.models import CacheClusterSpec, Endpoint, InvalidSpec, parse_spec
from cacheoperator.naming import ClusterRef, selector_string
from cacheoperator.rollout import held_statefulsets
from cacheoperator.scheduling import host_ports
from cacheoperator.status import (
    Event,
    Observed,
    compute_status,
    endpoints,
    invalid_status,
    is_ready,
    needs_host_port_pods,
    pod_endpoints,
    restore_events,
    started_at,
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
# Pods that are on a node and not finished: the ones whose host ports the scheduler counts.
ON_A_NODE = "spec.nodeName!=,status.phase!=Succeeded,status.phase!=Failed"
# Asking appliances what they restored: new pods asked per pass, and tries per pod start.
READS_PER_PASS = 4
READ_ATTEMPTS = 3


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Outcome:
    """What a pass did: `result` is ok, invalid or error (a refused child object)."""

    result: str
    status: dict[str, Any]
    events: list[Event] = field(default_factory=list)
    status_written: bool = False


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
        """`reports` reads what the appliances say about their CPUs and memory (None: the
        endpoints go without, and Pinned stays Unknown)."""
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
        self.read_restore = read_restore
        # (namespace, cluster) -> (pod uid, container start) -> (answer, times asked)
        self._restores: dict[tuple[str, str], dict[tuple[Any, Any], tuple[Restore, int]]] = {}

    def reconcile(self, namespace: str, name: str) -> None:
        self.coalescer.run((namespace, name), lambda: self._pass(namespace, name))

    def forget(self, namespace: str, name: str) -> None:
        self.metrics.forget(namespace, name)
        if self.reports is not None:
            self.reports.forget(namespace, name)

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
            status = invalid_status(
                cluster=ref.name,
                generation=generation,
                problems=exc.problems,
                observed=self.observe(ref),
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
        held: dict[str, str] = {}
        try:
            held = self.apply_children(ref, spec)
        except KubeError as exc:
            if exc.retryable:
                raise
            apply_error = str(exc)  # e.g. a nodeSelector key the API server rejects
        # With auth or TLS the memcached port wants what the operator does not hold: the
        # appliances' stats are read from /stats on their metrics port instead.
        stats_port = spec.metrics_port if spec.secured else None
        observed = self.observe(ref, stats_port)
        discovery = published
        if apply_error is None:
            nodes = members(ref, spec, observed.pods, published.nodes if published else ())
            discovery = next_discovery(published, nodes, endpoint, now)
        if spec.warm_restart.enabled:
            restores = self.restores_of(ref, observed.pods, stats_port)
            observed = replace(observed, restores=restores)
        status = compute_status(
            cluster=ref.name,
            generation=generation,
            spec=spec,
            observed=observed,
            previous=previous,
            now=now,
            apply_error=apply_error,
            discovery=discovery,
            held=held,
        )
        if apply_error is None:
            # Last, so that it lists the endpoints this very pass observed. The status (the
            # operator's memory of the version) is written after it, so a version is never
            # recorded that the appliances were not given.
            self.kube.apply(configmap(ref, spec, _endpoints(status), discovery))
        return self._report(ref, "error" if apply_error else "ok", previous, status)

    def apply_children(self, ref: ClusterRef, spec: CacheClusterSpec) -> dict[str, str]:
        """Apply what the spec wants; returns the StatefulSets whose new template waits for
        another's rollout (name -> what it waits for)."""
        desired = desired_objects(ref, spec, self.default_image)
        existing = [
            s
            for s in self.kube.list(STATEFULSETS, ref.namespace, selector_string(ref.name))
            if owned_by(s, ref.uid)
        ]
        wanted_sets = [o for o in desired if o["kind"] == "StatefulSet"]
        held = held_statefulsets(wanted_sets, existing)
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
        return held

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

    def restores_of(
        self, ref: ClusterRef, pods: Sequence[Mapping[str, Any]], stats_port: int | None = None
    ) -> dict[str, Restore]:
        """What each ready pod restored at its start, asked once per container start over
        the memcached protocol, or over HTTP on ``stats_port`` (at most READS_PER_PASS new
        pods a pass, a short timeout each; a pod that does not answer is asked again in up
        to READ_ATTEMPTS passes)."""
        known = self._restores.setdefault((ref.namespace, ref.name), {})
        out: dict[str, Restore] = {}
        live = set()
        reads = 0
        for pod in pods:
            if not is_ready(pod):
                continue
            meta = pod.get("metadata") or {}
            key = (meta.get("uid", meta.get("name")), started_at(pod))
            live.add(key)
            restore, attempts = known.get(key, (None, 0))
            if (restore is None or restore is UNKNOWN) and attempts < READ_ATTEMPTS:
                workers = pod_endpoints(pod, {})
                if workers and reads < READS_PER_PASS:
                    reads += 1
                    restore = self.read_restore(
                        workers[0].address, [w.port for w in workers], http_port=stats_port
                    )
                    known[key] = (restore, attempts + 1)
            if restore is not None:
                out[meta.get("name", "")] = restore
        for key in set(known) - live:
            del known[key]
        return out

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
        events = transitions(previous, status) + restore_events(previous, status)
        outcome = Outcome(result=result, status=status, events=events)
        if status != previous:
            self.kube.patch_status(CACHECLUSTERS, ref.namespace, ref.name, status)
            outcome.status_written = True
        return outcome
