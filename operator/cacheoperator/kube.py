"""The handful of API calls the operator makes, on plain dicts.

Built on the kubernetes client's ApiClient (its configuration, authentication and TLS) but
not on its typed models: the builders produce dicts, and server-side apply wants exactly
those dicts sent as `application/apply-patch+yaml` (JSON is YAML).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from kubernetes import client as k8s

from cacheoperator.models import GROUP, PLURAL, VERSION
from cacheoperator.naming import FIELD_MANAGER

REQUEST_TIMEOUT = (5, 30)  # connect, read (seconds)


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    namespaced: bool = True

    def path(self, namespace: str | None = None, name: str | None = None, sub: str = "") -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if self.namespaced and namespace:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name:
            base += f"/{quote(name, safe='')}"
        if sub:
            base += f"/{sub}"
        return base


CONFIGMAPS = Resource("", "v1", "configmaps")
SERVICES = Resource("", "v1", "services")
PODS = Resource("", "v1", "pods")
NODES = Resource("", "v1", "nodes", namespaced=False)
STATEFULSETS = Resource("apps", "v1", "statefulsets")
PDBS = Resource("policy", "v1", "poddisruptionbudgets")
CACHECLUSTERS = Resource(GROUP, VERSION, PLURAL)

_BY_KIND = {
    ("v1", "ConfigMap"): CONFIGMAPS,
    ("v1", "Service"): SERVICES,
    ("apps/v1", "StatefulSet"): STATEFULSETS,
    ("policy/v1", "PodDisruptionBudget"): PDBS,
}


class KubeError(Exception):
    """A non-2xx answer; `status` is the HTTP status, the message is the API server's."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status

    @property
    def retryable(self) -> bool:
        # Conflicts, throttling and server trouble pass; bad requests will not.
        return self.status in (0, 409, 429) or self.status >= 500


class Kube:
    """Typed-free access to the API server for the resources a CacheCluster touches."""

    def __init__(self, api_client: k8s.ApiClient):
        self.api = api_client

    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> dict[str, Any] | None:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        method, url, headers, _, _ = self.api.param_serialize(
            method,
            path,
            query_params=list((query or {}).items()),
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=body, _request_timeout=REQUEST_TIMEOUT
        )
        data = response.read()
        if response.status == 404 and method == "GET":
            return None
        if not 200 <= response.status < 300:
            raise KubeError(response.status, _status_message(data) or str(response.reason))
        return json.loads(data) if data else None

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply as the operator's field manager, taking over conflicting fields."""
        resource = _BY_KIND[(obj["apiVersion"], obj["kind"])]
        meta = obj["metadata"]
        result = self._request(
            "PATCH",
            resource.path(meta.get("namespace"), meta["name"]),
            query={"fieldManager": FIELD_MANAGER, "force": "true"},
            # A str body is sent as is; JSON is valid YAML for the apply content type.
            body=json.dumps(obj),
            content_type="application/apply-patch+yaml",
        )
        return result or {}

    def get(self, resource: Resource, namespace: str | None, name: str) -> dict[str, Any] | None:
        return self._request("GET", resource.path(namespace, name))

    def list(
        self,
        resource: Resource,
        namespace: str | None,
        label_selector: str = "",
        field_selector: str = "",
    ) -> list[dict[str, Any]]:
        """Every object of `resource` in `namespace` (None: in all namespaces)."""
        query = {"labelSelector": label_selector} if label_selector else {}
        if field_selector:
            query["fieldSelector"] = field_selector
        result = self._request("GET", resource.path(namespace), query=query) or {}
        return list(result.get("items") or [])

    def delete(self, resource: Resource, namespace: str, name: str, uid: str) -> None:
        """Delete exactly the object seen (uid precondition); its pods follow in the background."""
        body = {
            "apiVersion": "v1",
            "kind": "DeleteOptions",
            "propagationPolicy": "Background",
            "preconditions": {"uid": uid},
        }
        try:
            self._request(
                "DELETE",
                resource.path(namespace, name),
                body=body,
                content_type="application/json",
            )
        except KubeError as exc:
            if exc.status not in (404, 409):  # gone already, or replaced by a new object
                raise

    def patch(
        self, resource: Resource, namespace: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """A strategic merge patch (built-in kinds only): lists merge as their schema says,
        e.g. a pod's scheduling gates by name."""
        return (
            self._request(
                "PATCH",
                resource.path(namespace, name),
                body=patch,
                content_type="application/strategic-merge-patch+json",
            )
            or {}
        )

    def patch_status(
        self, resource: Resource, namespace: str, name: str, status: dict[str, Any]
    ) -> dict[str, Any]:
        """Replace the status through the status subresource (merge patch)."""
        return (
            self._request(
                "PATCH",
                resource.path(namespace, name, "status"),
                body={"status": status},
                content_type="application/merge-patch+json",
            )
            or {}
        )


def _status_message(data: bytes | None) -> str:
    try:
        return json.loads(data or b"{}").get("message", "")
    except ValueError:
        return (data or b"").decode("utf-8", "replace")[:500]


def connect(connections: int = 10) -> Kube:
    """In the cluster: the service account; outside: the current kubeconfig context.
    `connections`: how many requests may be in flight at once (one per thread that makes
    them); more would each open a new connection and close it again."""
    from kubernetes import config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    configuration = k8s.Configuration.get_default_copy()
    configuration.connection_pool_maxsize = connections
    return Kube(k8s.ApiClient(configuration))
