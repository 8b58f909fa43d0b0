"""kopf handlers: thin on purpose. Each one only decides *when* to reconcile; what a
reconcile does lives in `reconcile.ClusterController`, which the handlers find in kopf's
`memo` (put there by `main`).

When: a CacheCluster is found at start-up, created, or has a spec its status has not
caught up with (`needs_pass`), and whenever one of its StatefulSets or pods changes, so
the status follows the actual state (readiness, scheduling failures, pods moving) and edits
to owned objects are undone. A new pod that the placement gate holds (warm restart) is
released from its own event, before the pass.
The handlers only queue the cluster and return at once (they are coroutines: no thread is
taken for them, except for the release of a gated pod): the controller's own threads run
the passes, one per cluster at a time, and retry one that met a passing API failure. So a
burst of events never piles up in kopf waiting for threads, and every event that arrives
while a cluster waits folds into its one pass. They are all event handlers: kopf's create
and update handlers would patch its bookkeeping into every CacheCluster, all at once for a
burst of new ones.
No timers: kopf would add a finalizer for them, and then deleting a CacheCluster would
hang whenever the operator is down. Children go away through garbage collection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from cacheoperator.gate import is_gated
from cacheoperator.models import GROUP, PLURAL, VERSION
from cacheoperator.naming import LABEL_CLUSTER, LABEL_MANAGED_BY, MANAGED_BY
from cacheoperator.status import Event

CHILD_LABELS = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_CLUSTER: kopf.PRESENT}
# The same filter, applied by the API server: the operator never streams other pods.
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_CLUSTER}"
CHILD_RESOURCES = (("v1", "pods"), ("apps", "v1", "statefulsets"))


def post_event(body: Mapping[str, Any], event: Event) -> None:
    """A Kubernetes Event on the CacheCluster, for `kubectl describe`."""
    kopf.event(dict(body), type=event.type, reason=event.reason, message=event.message)


def needs_pass(event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Whether an event of a CacheCluster calls for a pass: it is listed at start-up (no
    type) or new, or its spec changed since the status was written (generation ahead of
    status.observedGeneration). The operator's own status writes call for none."""
    if event_type in (None, "ADDED"):
        return True
    if event_type != "MODIFIED":
        return False
    meta = body.get("metadata") or {}
    observed = (body.get("status") or {}).get("observedGeneration")
    return not meta.get("deletionTimestamp") and meta.get("generation") != observed


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the operator's handlers to `registry`."""

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the operator's own API client: in-cluster service account,
        # else the kubeconfig's current context.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="configure", registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # Should a create or update handler ever be added, kopf's bookkeeping goes to
        # annotations under our own prefix: the status belongs to the CRD's schema, which
        # would prune kopf's fields from it anyway.
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=GROUP, key="last-handled-configuration"
        )
        # Renew watches now and then, so a silently dropped connection cannot stall us.
        settings.watching.server_timeout = 300
        settings.watching.client_timeout = 330
        settings.watching.connect_timeout = 30
        for resource in CHILD_RESOURCES:
            settings.watching.label_selectors[resource] = CHILD_SELECTOR
        settings.peering.stealth = True  # keep-alives are not worth a log line each
        settings.posting.level = logging.INFO

    @kopf.on.event(GROUP, VERSION, PLURAL, id="cluster-changed", registry=registry)
    async def cluster_changed(
        type: str | None,
        body: Mapping[str, Any],
        namespace: str,
        name: str,
        memo: kopf.Memo,
        **_: Any,
    ) -> None:
        if type == "DELETED":
            memo.controller.forget(namespace, name)
            return
        memo.controller.seen(body)
        if needs_pass(type, body):
            memo.controller.reconcile(namespace, name)

    @kopf.on.event(
        "apps",
        "v1",
        "statefulsets",
        id="statefulset-changed",
        labels=CHILD_LABELS,
        registry=registry,
    )
    async def child_changed(
        namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any
    ) -> None:
        memo.controller.reconcile(namespace, labels[LABEL_CLUSTER])

    @kopf.on.event("v1", "pods", id="pod-changed", labels=CHILD_LABELS, registry=registry)
    async def pod_changed(
        type: str | None,
        body: kopf.Body,
        namespace: str,
        labels: Mapping[str, str],
        memo: kopf.Memo,
        logger: logging.Logger,
        **_: Any,
    ) -> None:
        # A new pod held by the placement gate (warm restart) is released first, at once:
        # it waits for nothing else (gate.py). Its API calls block, so they run on a thread.
        # Then the pass, as for any child; it also releases what it finds still gated.
        if type != "DELETED" and is_gated(body):
            try:
                await asyncio.to_thread(memo.controller.release, body)
            except Exception:  # e.g. the API server out of reach: the pass tries again
                logger.exception("release of pod %s/%s failed", namespace, body["metadata"]["name"])
        memo.controller.reconcile(namespace, labels[LABEL_CLUSTER])
