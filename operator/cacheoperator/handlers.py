"""kopf handlers: thin on purpose. Each one only decides *when* to reconcile; what a
reconcile does lives in `reconcile.ClusterController`, which the handlers find in kopf's
`memo` (put there by `main`).

When: a CacheCluster is created, changed or found at start-up (with kopf's retries), and
whenever one of its StatefulSets or pods changes, so the status follows the actual state
(readiness, scheduling failures, pods moving) and edits to owned objects are undone. A new
pod that the placement gate holds (warm restart) is released from its own event, before
the pass.
No timers: kopf would add a finalizer for them, and then deleting a CacheCluster would
hang whenever the operator is down. Children go away through garbage collection.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import kopf

from cacheoperator.kube import KubeError
from cacheoperator.models import GROUP, PLURAL, VERSION
from cacheoperator.naming import LABEL_CLUSTER, LABEL_MANAGED_BY, MANAGED_BY
from cacheoperator.status import Event

RETRY_DELAY = 10  # seconds before kopf retries a pass that met a passing API failure
CHILD_LABELS = {LABEL_MANAGED_BY: MANAGED_BY, LABEL_CLUSTER: kopf.PRESENT}
# The same filter, applied by the API server: the operator never streams other pods.
CHILD_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGED_BY},{LABEL_CLUSTER}"
CHILD_RESOURCES = (("v1", "pods"), ("apps", "v1", "statefulsets"))


def post_event(body: Mapping[str, Any], event: Event) -> None:
    """A Kubernetes Event on the CacheCluster, for `kubectl describe`."""
    kopf.event(dict(body), type=event.type, reason=event.reason, message=event.message)


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the operator's handlers to `registry`."""

    @kopf.on.login(id="login", registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # The same credentials as the operator's own API client: in-cluster service account,
        # else the kubeconfig's current context.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(id="configure", registry=registry)
    def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        # kopf's handler bookkeeping goes to annotations under our own prefix: the status
        # belongs to the CRD's schema, which would prune kopf's fields from it anyway.
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

    @kopf.on.resume(GROUP, VERSION, PLURAL, id="reconcile", registry=registry)
    @kopf.on.create(GROUP, VERSION, PLURAL, id="reconcile", registry=registry)
    @kopf.on.update(GROUP, VERSION, PLURAL, id="reconcile", registry=registry)
    def reconcile_cluster(namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        try:
            memo.controller.reconcile(namespace, name)
        except KubeError as exc:
            if exc.retryable:
                raise kopf.TemporaryError(str(exc), delay=RETRY_DELAY) from exc
            # e.g. forbidden: retrying will not help until someone fixes RBAC; the next
            # change to the cluster or its pods tries again.
            raise kopf.PermanentError(str(exc)) from exc

    @kopf.on.event(GROUP, VERSION, PLURAL, id="forget-deleted", registry=registry)
    def cluster_event(type: str, namespace: str, name: str, memo: kopf.Memo, **_: Any) -> None:
        if type == "DELETED":
            memo.controller.forget(namespace, name)

    @kopf.on.event(
        "apps",
        "v1",
        "statefulsets",
        id="statefulset-changed",
        labels=CHILD_LABELS,
        registry=registry,
    )
    def child_changed(
        namespace: str,
        labels: Mapping[str, str],
        memo: kopf.Memo,
        logger: logging.Logger,
        **_: Any,
    ) -> None:
        try:
            memo.controller.reconcile(namespace, labels[LABEL_CLUSTER])
        except KubeError as exc:
            # Event handlers are not retried; the next event, or the cluster's own
            # handlers, will run the pass again.
            logger.warning("reconcile of %s/%s failed: %s", namespace, labels[LABEL_CLUSTER], exc)

    @kopf.on.event("v1", "pods", id="pod-changed", labels=CHILD_LABELS, registry=registry)
    def pod_changed(
        type: str,
        body: kopf.Body,
        namespace: str,
        labels: Mapping[str, str],
        memo: kopf.Memo,
        logger: logging.Logger,
        **_: Any,
    ) -> None:
        # A new pod held by the placement gate (warm restart) is released first, at once:
        # it waits for nothing else (gate.py). Then the pass, as for any child.
        if type != "DELETED":
            try:
                memo.controller.release(body)
            except Exception:  # e.g. the API server out of reach: the pass tries again
                logger.exception("release of pod %s/%s failed", namespace, body["metadata"]["name"])
        child_changed(namespace=namespace, labels=labels, memo=memo, logger=logger)
