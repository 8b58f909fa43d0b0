"""The pod template of a cache appliance: one `cacheserver` container, Guaranteed QoS.

Settings reach the server as its CACHESERVER_* environment variables (the probe reads the
same ones, so both agree on address and port); the only flag is `--pin`, plus extraArgs.
"""

from __future__ import annotations

import math
from typing import Any

from cacheoperator.discovery import MEMBERSHIP_KEY, MEMBERSHIP_PATH, MOUNT_DIR
from cacheoperator.gate import SNAPSHOT_NODE, scheduling_gates
from cacheoperator.models import CacheClusterSpec
from cacheoperator.naming import (
    AUTH_MOUNT,
    CONTAINER,
    LABEL_PARTITION,
    LABEL_STATEFULSET,
    TLS_MOUNT,
    common_labels,
    configmap_name,
)
from cacheoperator.placement import affinity, topology_spread
from cacheoperator.quantity import to_decimal, to_mebibytes
from cacheserver.config import worker_path

RUN_AS_USER = 10001  # the image's non-root user (see Dockerfile)
TERMINATION_GRACE_SECONDS = 30
PROBE_COMMAND = "cacheserver-probe"
# Warm restart: where the node's snapshot directory (a hostPath) appears in the containers.
WARM_VOLUME = "warm-restart"
WARM_MOUNT = "/var/lib/cacheserver/warm"
WARM_INIT_MOUNT = "/warm"
SNAPSHOT_FILE = f"{WARM_MOUNT}/snapshot"
# The slowest save measured (docs/benchmarks.md: 0.23 GB/s for 100-byte values on a loaded
# 2-CPU machine), halved: the grace period must cover a save of the whole memory limit.
SAVE_BYTES_PER_SECOND = 100_000_000
# A snapshot is restored within seconds of its save or not at all; older ones are removed
# by the next appliance starting on the node.
SNAPSHOT_MAX_AGE_SECONDS = 900
# Who may talk to an appliance: the Secrets of spec.auth and spec.tls, mounted as volumes
# (never subPath, which would freeze them: the kubelet swaps a changed Secret in place and
# the server takes it without a restart).
AUTH_VOLUME = "auth"
TLS_VOLUME = "tls"
SECRET_FILE_MODE = 0o440  # read by the server's group (fsGroup), nobody else
# With auth or TLS the probe asks each worker's admin socket (version and stats only, no
# credentials); it lives on the pod's own /tmp, which nothing outside the pod can reach.
ADMIN_SOCKET = "/tmp/cacheserver-admin.sock"


def server_env(spec: CacheClusterSpec) -> dict[str, str]:
    """The server's settings that follow from the spec alone (also shown in the ConfigMap)."""
    env = {
        "CACHESERVER_PORT": str(spec.port),
        "CACHESERVER_UDP_PORT": str(spec.udp_port) if spec.udp.enabled else "0",
        # auto: the server sizes the cache from its own cgroup limit; never a guessed -m.
        "CACHESERVER_MEMORY_LIMIT": (
            str(to_mebibytes(spec.memory.size))
            if spec.memory.mode == "fixed" and spec.memory.size is not None
            else "auto"
        ),
        "CACHESERVER_WORKERS": str(spec.workers),
        "CACHESERVER_METRICS_PORT": str(spec.metrics_port) if spec.monitoring.enabled else "0",
        # The membership the operator publishes, for `config get cluster` (auto discovery).
        "CACHESERVER_CLUSTER_CONFIG": MEMBERSHIP_PATH,
    }
    if spec.memory.headroom is not None:
        env["CACHESERVER_MEMORY_HEADROOM"] = str(to_mebibytes(spec.memory.headroom))
    if spec.warm_restart.enabled:
        env["CACHESERVER_MEMORY_FILE"] = SNAPSHOT_FILE
    if not spec.flush_all:
        env["CACHESERVER_DISABLE_FLUSH_ALL"] = "true"
    if spec.auth is not None:
        env["CACHESERVER_AUTH_FILE"] = f"{AUTH_MOUNT}/{spec.auth.key}"
    if spec.tls is not None:
        env["CACHESERVER_SSL_ENABLED"] = "true"
        env["CACHESERVER_SSL_CHAIN_CERT"] = f"{TLS_MOUNT}/tls.crt"
        env["CACHESERVER_SSL_KEY"] = f"{TLS_MOUNT}/tls.key"
        if spec.tls.verify_mode:
            env["CACHESERVER_SSL_VERIFY_MODE"] = str(spec.tls.verify_mode)
            env["CACHESERVER_SSL_CA_CERT"] = f"{TLS_MOUNT}/ca.crt"
        if spec.tls.plaintext_port is not None and not spec.host_network:
            env["CACHESERVER_LISTEN"] = _listen("0.0.0.0", spec.tls.plaintext_port)
    if spec.secured:
        env["CACHESERVER_ADMIN_SOCKET"] = ADMIN_SOCKET
    return env


def _listen(host: str, plaintext_port: int) -> str:
    """memcached's -l with TLS on the workers' ports and a notls: listener next to them."""
    return f"{host},notls:{host}:{plaintext_port}"


def termination_grace_seconds(spec: CacheClusterSpec) -> int:
    """Time the kubelet gives a stopping pod before SIGKILL: with warm restart, enough to
    save the whole memory limit at SAVE_BYTES_PER_SECOND on top of the usual 30 s."""
    if not spec.warm_restart.enabled:
        return TERMINATION_GRACE_SECONDS
    limit = int(to_decimal(spec.resources.memory))
    return TERMINATION_GRACE_SECONDS + math.ceil(limit / SAVE_BYTES_PER_SECOND)


def warm_subdir(namespace: str, cluster: str) -> str:
    """The pod's directory under the node's warm-restart hostPath (kubelet's subPathExpr)."""
    return f"{namespace}/{cluster}/$(POD_NAME)"


def warm_init_container(
    spec: CacheClusterSpec, image: str, namespace: str, cluster: str
) -> dict[str, Any]:
    """Creates the pod's snapshot directory on the node for the server's user (the kubelet
    makes hostPath directories as root), removes snapshots nobody came back for, and the
    pod's own when its appliance last ran on another node (gate.py: the operator writes
    that node into the pod's annotation as it lets the pod be scheduled)."""
    out: dict[str, Any] = {"name": "warm-restart-dir", "image": image}
    if spec.image_pull_policy:
        out["imagePullPolicy"] = spec.image_pull_policy
    resources = {"cpu": spec.resources.cpu, "memory": "64Mi"}
    out |= {
        "command": ["cacheserver-warm-dir"],
        "args": [
            WARM_INIT_MOUNT,
            warm_subdir(namespace, cluster),
            "--owner",
            f"{RUN_AS_USER}:{RUN_AS_USER}",
            "--max-age",
            str(SNAPSHOT_MAX_AGE_SECONDS),
            "--node",
            "$(NODE_NAME)",
            "--last-node",
            "$(SNAPSHOT_NODE)",
        ],
        "env": [
            {"name": "POD_NAME", "valueFrom": _field("metadata.name")},
            {"name": "NODE_NAME", "valueFrom": _field("spec.nodeName")},
            # Empty when the annotation is missing: the snapshot is kept, as before.
            {
                "name": "SNAPSHOT_NODE",
                "valueFrom": _field(f"metadata.annotations['{SNAPSHOT_NODE}']"),
            },
        ],
        # Guaranteed QoS needs requests == limits in every container, init ones included.
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        # Root, for chown and for removing other pods' stale snapshots; nothing else.
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"], "add": ["CHOWN", "DAC_OVERRIDE", "FOWNER"]},
        },
        "volumeMounts": [{"name": WARM_VOLUME, "mountPath": WARM_INIT_MOUNT}],
    }
    return out


def _field(path: str) -> dict[str, Any]:
    return {"fieldRef": {"fieldPath": path}}


def _downward_env(spec: CacheClusterSpec, partition: int | None) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {
            "name": "CACHESERVER_CONTAINER_MEMORY_LIMIT",
            "valueFrom": {
                "resourceFieldRef": {
                    "containerName": CONTAINER,
                    "resource": "limits.memory",
                    "divisor": "1",
                }
            },
        },
        {"name": "NODE_NAME", "valueFrom": _field("spec.nodeName")},
        {"name": "POD_NAME", "valueFrom": _field("metadata.name")},
        {"name": "HOST_IP", "valueFrom": _field("status.hostIP")},
    ]
    if spec.host_network:
        # On the node's network, listen on the node's address only, not on every interface.
        if spec.tls is not None and spec.tls.plaintext_port is not None:
            # HOST_IP is defined above: the kubelet expands $(HOST_IP) in a later value.
            listen = _listen("$(HOST_IP)", spec.tls.plaintext_port)
            env.append({"name": "CACHESERVER_LISTEN", "value": listen})
        else:
            env.append({"name": "CACHESERVER_LISTEN", "valueFrom": _field("status.hostIP")})
    if partition is not None:
        # Like EC2 instance metadata: the pod learns its partition from its own label.
        env.append(
            {
                "name": "CACHESERVER_PARTITION",
                "valueFrom": _field(f"metadata.labels['{LABEL_PARTITION}']"),
            }
        )
    return env


def _probe_command(spec: CacheClusterSpec) -> list[str]:
    if spec.secured:
        # The port wants credentials or TLS: each worker's admin socket answers instead.
        sockets = [worker_path(ADMIN_SOCKET, i, spec.workers) for i in range(spec.workers)]
        if spec.workers == 1:
            return [PROBE_COMMAND, "--admin-socket", sockets[0]]
        return ["sh", "-c", " && ".join(f"{PROBE_COMMAND} --admin-socket {s}" for s in sockets)]
    # The probe reads CACHESERVER_LISTEN/CACHESERVER_PORT; on the pod network the server
    # listens on 0.0.0.0, so the probe is pointed at loopback.
    listen = [] if spec.host_network else ["-l", "127.0.0.1"]
    if spec.workers == 1:
        return [PROBE_COMMAND, *listen]
    # Every worker is its own shard: the pod is only healthy when all of them answer.
    checks = " && ".join(
        " ".join([PROBE_COMMAND, *listen, "-p", str(spec.port + i)]) for i in range(spec.workers)
    )
    return ["sh", "-c", checks]


def _probes(spec: CacheClusterSpec) -> dict[str, Any]:
    command = {"exec": {"command": _probe_command(spec)}}
    startup: dict[str, Any] = {}
    if spec.warm_restart.enabled:
        # The server listens once its restore is done, which can take as long as a save:
        # the liveness probe must not kill it meanwhile (a restore cut short is lost).
        period = 2
        startup["startupProbe"] = {
            **command,
            "periodSeconds": period,
            "timeoutSeconds": 2,
            "failureThreshold": math.ceil(termination_grace_seconds(spec) / period),
        }
    return {
        **startup,
        "readinessProbe": {
            **command,
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            **command,
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 3,
            "failureThreshold": 3,
        },
    }


def _ports(spec: CacheClusterSpec) -> list[dict[str, Any]]:
    def port(name: str, number: int, protocol: str) -> dict[str, Any]:
        entry: dict[str, Any] = {"name": name, "containerPort": number, "protocol": protocol}
        if spec.host_network:
            # Declared host ports let the scheduler keep two appliances off one node's port.
            entry["hostPort"] = number
        return entry

    ports = [port(f"tcp-{i}", spec.port + i, "TCP") for i in range(spec.workers)]
    if spec.tls is not None and spec.tls.plaintext_port is not None:
        plain = spec.tls.plaintext_port
        ports += [port(f"plain-{i}", plain + i, "TCP") for i in range(spec.workers)]
    if spec.udp.enabled:
        ports += [port(f"udp-{i}", spec.udp_port + i, "UDP") for i in range(spec.workers)]
    if spec.monitoring.enabled:
        ports.append(port("metrics", spec.metrics_port, "TCP"))
    return ports


def container(
    spec: CacheClusterSpec, image: str, partition: int | None, namespace: str, cluster: str
) -> dict[str, Any]:
    # requests == limits for both CPU and memory: Guaranteed QoS, and with whole cores the
    # static CPU manager hands out exclusive CPUs that --pin then binds the workers to.
    resources = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    args = (["--pin"] if spec.pinning else []) + list(spec.extra_args)
    out: dict[str, Any] = {"name": CONTAINER, "image": image}
    if spec.image_pull_policy:
        out["imagePullPolicy"] = spec.image_pull_policy
    out |= {
        "command": ["cacheserver"],
        "args": args,
        "env": [{"name": k, "value": v} for k, v in server_env(spec).items()]
        + _downward_env(spec, partition),
        "ports": _ports(spec),
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        **_probes(spec),
        # The server writes why it stopped to /dev/termination-log (the default path);
        # a crash before it could is still explained by the tail of its log.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "discovery", "mountPath": MOUNT_DIR, "readOnly": True},
        ],
    }
    if spec.warm_restart.enabled:
        # Only this pod's own directory of the node's, so it sees no other pod's snapshot.
        out["volumeMounts"].append(
            {
                "name": WARM_VOLUME,
                "mountPath": WARM_MOUNT,
                "subPathExpr": warm_subdir(namespace, cluster),
            }
        )
    if spec.auth is not None:
        out["volumeMounts"].append({"name": AUTH_VOLUME, "mountPath": AUTH_MOUNT, "readOnly": True})
    if spec.tls is not None:
        out["volumeMounts"].append({"name": TLS_VOLUME, "mountPath": TLS_MOUNT, "readOnly": True})
    return out


def _secret_volume(name: str, secret: str) -> dict[str, Any]:
    # Optional: a missing Secret (or key) does not hold the pod in ContainerCreating, where
    # only an event would say why; the server starts, finds no file, and stops with a
    # termination message naming it, which the CacheCluster's Degraded condition shows.
    return {
        "name": name,
        "secret": {"secretName": secret, "optional": True, "defaultMode": SECRET_FILE_MODE},
    }


def pod_template(
    spec: CacheClusterSpec,
    cluster: str,
    statefulset: str,
    image: str,
    partition: int | None,
    namespace: str,
) -> dict[str, Any]:
    labels = common_labels(cluster) | {LABEL_STATEFULSET: statefulset}
    if partition is not None:
        labels[LABEL_PARTITION] = str(partition)
    metadata: dict[str, Any] = {"labels": labels}
    if spec.monitoring.enabled:
        metadata["annotations"] = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(spec.metrics_port),
            "prometheus.io/path": "/metrics",
        }
    pod: dict[str, Any] = {
        "hostNetwork": spec.host_network,
        # Host-network pods would otherwise get the node's resolver, not cluster DNS.
        "dnsPolicy": "ClusterFirstWithHostNet" if spec.host_network else "ClusterFirst",
        # Service links would inject <SERVICE>_PORT variables, and a Service named
        # "cacheserver" would collide with CACHESERVER_PORT.
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": termination_grace_seconds(spec),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if spec.secured:
        # The Secrets' files belong to this group (mode 0440): readable by the server only.
        pod["securityContext"]["fsGroup"] = RUN_AS_USER
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [
            t.model_dump(by_alias=True, exclude_none=True) for t in spec.tolerations
        ]
    pod["affinity"] = affinity(spec, cluster, partition)
    spread = topology_spread(spec, cluster)
    if spread:
        pod["topologySpreadConstraints"] = spread
    if spec.warm_restart.enabled:
        # Held back from the scheduler until the operator has pointed it at the node of
        # its snapshot (gate.py).
        pod["schedulingGates"] = scheduling_gates()
        pod["initContainers"] = [warm_init_container(spec, image, namespace, cluster)]
    pod["containers"] = [container(spec, image, partition, namespace, cluster)]
    pod["volumes"] = [
        # The root filesystem is read-only; a small scratch /tmp for anything that insists.
        {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}},
        # The membership for auto discovery, updated in place by the kubelet (never subPath:
        # that would freeze it). Optional, so a deleted ConfigMap never blocks a pod's start;
        # the server serves the last membership it read meanwhile.
        {
            "name": "discovery",
            "configMap": {
                "name": configmap_name(cluster),
                "items": [{"key": MEMBERSHIP_KEY, "path": MEMBERSHIP_KEY}],
                "optional": True,
            },
        },
    ]
    if spec.warm_restart.enabled:
        # Node memory that outlives the pod: the snapshot is there when the pod comes back.
        pod["volumes"].append(
            {
                "name": WARM_VOLUME,
                "hostPath": {"path": spec.warm_restart.host_path, "type": "DirectoryOrCreate"},
            }
        )
    if spec.auth is not None:
        pod["volumes"].append(_secret_volume(AUTH_VOLUME, spec.auth.secret_name))
    if spec.tls is not None:
        pod["volumes"].append(_secret_volume(TLS_VOLUME, spec.tls.secret_name))
    return {"metadata": metadata, "spec": pod}
