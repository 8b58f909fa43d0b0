"""Names and labels of the objects a CacheCluster owns, in one place."""

from __future__ import annotations

from dataclasses import dataclass

from cacheoperator import __version__
from cacheoperator.models import API_VERSION, KIND

LABEL_CLUSTER = "cache.appliance.io/cluster"
LABEL_PARTITION = "cache.appliance.io/partition"
LABEL_STATEFULSET = "cache.appliance.io/statefulset"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "cacheoperator"
FIELD_MANAGER = "cacheoperator"
CONTAINER = "cacheserver"
# Where the server container finds the Secrets of spec.auth and spec.tls (pods.py mounts
# them; status.py recognises them in a server's termination message).
AUTH_MOUNT = "/etc/cacheserver/auth"
TLS_MOUNT = "/etc/cacheserver/tls"
# The chart passes the operator's own image (server and operator ship in one image).
DEFAULT_IMAGE = f"cache-appliance:{__version__}"


@dataclass(frozen=True)
class ClusterRef:
    """Identity of one CacheCluster object: what its children point back to."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict:
        # controller=true lets the garbage collector delete the children with the cluster;
        # blockOwnerDeletion keeps foreground deletion honest.
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }


def statefulset_name(cluster: str, partition: int | None) -> str:
    return cluster if partition is None else f"{cluster}-p{partition}"


def headless_service_name(cluster: str) -> str:
    return f"{cluster}-headless"


def client_service_name(cluster: str) -> str:
    return cluster


def configmap_name(cluster: str) -> str:
    return f"{cluster}-config"


def discovery_service_name(cluster: str) -> str:
    return f"{cluster}-discovery"


def pod_host(pod: str, cluster: str, namespace: str) -> str:
    """A pod's stable DNS name: StatefulSet pods get one under their headless Service."""
    return f"{pod}.{headless_service_name(cluster)}.{namespace}.svc"


def pdb_name(cluster: str) -> str:
    return cluster


def selector_labels(cluster: str) -> dict[str, str]:
    """Labels every pod of the cluster has, and nothing else has."""
    return {LABEL_CLUSTER: cluster}


def selector_string(cluster: str) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(cluster).items())


def common_labels(cluster: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "cacheserver",
        "app.kubernetes.io/instance": cluster,
        "app.kubernetes.io/component": "cache",
        LABEL_MANAGED_BY: MANAGED_BY,
        **selector_labels(cluster),
    }
