"""Smoke tests of the e2e infrastructure: the control plane validates and schedules, the
node agent's nodes run pods as real processes that answer on their node's address, turn
Ready only from their own probe, live in a memory cgroup with their limit, are restarted
when killed and stopped when deleted."""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import socket
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.container import default_path
from e2e.nodeagent import RACK_LABEL, ZONE_LABEL

HOST_IP_ENV = {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}


def web_container(port: int, probe: dict | None = None, memory: str = "64Mi") -> dict:
    """python3's http.server bound to the node's address, the way a hostNetwork pod binds."""
    container = {
        "name": "web",
        "image": "python:3",
        "command": ["python3", "-m", "http.server", "--bind", "$(HOST_IP)", str(port)],
        "env": [HOST_IP_ENV],
        "ports": [{"name": "http", "containerPort": port}],
        "resources": {"limits": {"memory": memory}},
    }
    if probe:
        container["readinessProbe"] = probe
    return container


def pod_template(app: str, container: dict) -> dict:
    return {
        "metadata": {"labels": {"app": app}},
        "spec": {
            "hostNetwork": True,
            "dnsPolicy": "ClusterFirstWithHostNet",
            "terminationGracePeriodSeconds": 10,
            "containers": [container],
        },
    }


def free_port() -> int:
    return random.randint(20000, 29999)


def accepts(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
        return True
    return False


def pid_of(pod: client.V1Pod) -> int:
    """The node agent reports the process id as the container id (nodeagent://<pid>)."""
    container_id = pod.status.container_statuses[0].container_id
    assert container_id and container_id.startswith("nodeagent://"), container_id
    return int(container_id.removeprefix("nodeagent://"))


def is_ready(pod: client.V1Pod) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


def test_nodes_register_with_topology_and_heartbeats(api, agent):
    core = client.CoreV1Api(api)
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert sorted(nodes) == ["node-1", "node-2", "node-3"]
    assert {n.metadata.labels[ZONE_LABEL] for n in nodes.values()} == {"zone-a", "zone-b"}
    assert all(n.metadata.labels.get(RACK_LABEL) for n in nodes.values())
    for name, node in nodes.items():
        assert node.metadata.labels["kubernetes.io/hostname"] == name
        addresses = {a.type: a.address for a in node.status.addresses}
        assert addresses["InternalIP"].startswith("127.")
        assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
        assert node.status.allocatable["cpu"] and node.status.allocatable["memory"]
        lease = client.CoordinationV1Api(api).read_namespaced_lease(name, "kube-node-lease")
        assert lease.spec.holder_identity == name
        age = datetime.now(UTC) - lease.spec.renew_time
        assert age.total_seconds() < 40, f"lease of {name} is {age} old"


def test_api_server_rejects_invalid_objects(api, namespace):
    """Built-in validation and a CRD's CEL rule both answer 422 with the field named."""
    apps = client.AppsV1Api(api)
    with pytest.raises(ApiException) as bad_deployment:
        apps.create_namespaced_deployment(
            namespace,
            {
                "metadata": {"name": "bad"},
                "spec": {
                    "replicas": -1,
                    "selector": {"matchLabels": {"app": "bad"}},
                    "template": pod_template("bad", web_container(free_port())),
                },
            },
        )
    assert bad_deployment.value.status == 422
    assert "spec.replicas" in bad_deployment.value.body

    group = f"e2e{secrets.token_hex(3)}.cache.appliance.io"
    ext = client.ApiextensionsV1Api(api)
    crd = {
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {
                                        "minReplicas": {"type": "integer"},
                                        "maxReplicas": {"type": "integer"},
                                    },
                                    "x-kubernetes-validations": [
                                        {
                                            "rule": "self.minReplicas <= self.maxReplicas",
                                            "message": "minReplicas must not exceed maxReplicas",
                                        }
                                    ],
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    ext.create_custom_resource_definition(crd)
    try:
        custom = client.CustomObjectsApi(api)

        def create(lo: int, hi: int, name: str):
            body = {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": name},
                "spec": {"minReplicas": lo, "maxReplicas": hi},
            }
            return custom.create_namespaced_custom_object(group, "v1", namespace, "widgets", body)

        # The CRD is served once it is Established; creating too early gets a 404.
        def established():
            try:
                return create(1, 3, "good")
            except ApiException as e:
                if e.status == 404:
                    return None
                raise

        from e2e.cluster import wait_for

        wait_for("the Widget CRD to be served", established, 30)
        with pytest.raises(ApiException) as invalid:
            create(5, 3, "bad")
        assert invalid.value.status == 422
        assert "minReplicas must not exceed maxReplicas" in invalid.value.body
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")


def test_deployment_is_scheduled_runs_and_is_ready_only_from_its_probe(
    api, agent, namespace, eventually, tmp_path: Path
):
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    port = free_port()
    marker = tmp_path / "ready"
    probe = {
        "exec": {"command": ["test", "-f", str(marker)]},
        "periodSeconds": 1,
        "failureThreshold": 1,
    }
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": pod_template("web", web_container(port, probe)),
            },
        },
    )

    def pods():
        return core.list_namespaced_pod(namespace, label_selector="app=web").items

    def serving():
        current = pods()
        return len(current) == 2 and all(
            p.status.pod_ip and accepts(p.status.pod_ip, port) for p in current
        )

    eventually("both web pods to serve on their node's address", serving)
    running = pods()
    # The same hostNetwork port cannot be used twice on a node: the scheduler spreads them.
    assert len({p.spec.node_name for p in running}) == 2
    node_ips = {
        n.metadata.name: next(a.address for a in n.status.addresses if a.type == "InternalIP")
        for n in core.list_node().items
    }
    for pod in running:
        assert pod.status.pod_ip == pod.status.host_ip == node_ips[pod.spec.node_name]
    # Serving, but the probe says no: not Ready.
    assert not any(is_ready(p) for p in pods())

    marker.touch()
    eventually("both pods Ready from their probe", lambda: all(is_ready(p) for p in pods()))
    eventually(
        "the deployment to count 2 ready replicas",
        lambda: apps.read_namespaced_deployment("web", namespace).status.ready_replicas == 2,
    )
    marker.unlink()
    eventually("both pods NotReady again", lambda: not any(is_ready(p) for p in pods()))

    apps.delete_namespaced_deployment("web", namespace)
    eventually("the pods to be deleted", lambda: not pods())
    for pod in running:
        assert not accepts(pod.status.pod_ip, port), "the process outlived its pod"


def test_pod_runs_in_a_memory_cgroup_with_downward_api_env(api, agent, namespace, eventually):
    if agent.cgroups is None:
        pytest.skip(f"no cgroups on this machine: {agent.cgroups_error}")
    core = client.CoreV1Api(api)
    limit = 96 * 1024 * 1024
    pod = {
        "metadata": {"name": "sized", "labels": {"tier": "cache"}},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {
                    "name": "main",
                    "image": "python:3",
                    "command": ["python3", "-c", "import time; time.sleep(600)"],
                    "args": ["$(POD_NAME)", "$(MEMORY_LIMIT)", "$$(POD_NAME)", "$(UNKNOWN)"],
                    "env": [
                        {
                            "name": "POD_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                        },
                        {
                            "name": "TIER",
                            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['tier']"}},
                        },
                        {
                            "name": "NODE_NAME",
                            "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}},
                        },
                        {
                            "name": "MEMORY_LIMIT",
                            "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}},
                        },
                        {
                            "name": "MEMORY_LIMIT_MI",
                            "valueFrom": {
                                "resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}
                            },
                        },
                        {"name": "GREETING", "value": "hello $(POD_NAME)"},
                    ],
                    "resources": {"limits": {"memory": str(limit)}},
                }
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)

    def started():
        p = core.read_namespaced_pod("sized", namespace)
        statuses = p.status.container_statuses or []
        return p if statuses and statuses[0].state.running else None

    running = eventually("the pod's process to run", started)
    pid = pid_of(running)
    environ = dict(
        item.split("=", 1)
        for item in Path(f"/proc/{pid}/environ").read_text().split("\0")
        if "=" in item
    )
    assert environ["POD_NAME"] == "sized"
    assert environ["TIER"] == "cache"
    assert environ["NODE_NAME"] == running.spec.node_name
    assert environ["MEMORY_LIMIT"] == str(limit)
    assert environ["MEMORY_LIMIT_MI"] == "96"
    assert environ["GREETING"] == "hello sized"
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    assert argv[-4:] == ["sized", str(limit), "$(POD_NAME)", "$(UNKNOWN)"]

    limit_file = memory_limit_file(pid)
    assert int(limit_file.read_text()) == limit, f"{limit_file} is not the pod's limit"

    core.delete_namespaced_pod("sized", namespace, grace_period_seconds=1)
    eventually("the pod's process to stop", lambda: not Path(f"/proc/{pid}").exists())


def memory_limit_file(pid: int) -> Path:
    """The memory limit file of the cgroup ``pid`` lives in (v1 or v2)."""
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"
    unified = next(
        line.split(":", 2)[2]
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()
        if line.startswith("0::")
    )
    return Path("/sys/fs/cgroup") / unified.lstrip("/") / "memory.max"


def test_killed_process_is_restarted_and_counted(api, agent, namespace, eventually):
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    port = free_port()
    probe = {"tcpSocket": {"port": "http"}, "periodSeconds": 1}
    apps.create_namespaced_stateful_set(
        namespace,
        {
            "metadata": {"name": "cache"},
            "spec": {
                "replicas": 1,
                "serviceName": "cache",
                "selector": {"matchLabels": {"app": "cache"}},
                "template": pod_template("cache", web_container(port, probe)),
            },
        },
    )

    def pod():
        with contextlib.suppress(ApiException):
            return core.read_namespaced_pod("cache-0", namespace)
        return None

    first = eventually("cache-0 to be Ready", lambda: (p := pod()) and is_ready(p) and p)
    first_pid = pid_of(first)
    os.kill(first_pid, signal.SIGKILL)

    def restarted():
        p = pod()
        status = p and p.status.container_statuses and p.status.container_statuses[0]
        return p if status and status.restart_count == 1 and is_ready(p) else None

    again = eventually("cache-0 to restart and be Ready again", restarted)
    status = again.status.container_statuses[0]
    assert pid_of(again) != first_pid
    assert status.last_state.terminated.exit_code == 128 + signal.SIGKILL
    assert accepts(again.status.pod_ip, port)


def test_guaranteed_pod_gets_cpus_of_its_own(api, agent, namespace, eventually):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to pin exclusively")
    core = client.CoreV1Api(api)
    resources = {"cpu": "1", "memory": "64Mi"}
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "pinned"},
            "spec": {
                "hostNetwork": True,
                "containers": [
                    {
                        "name": "main",
                        "image": "python:3",
                        "command": ["python3", "-c", "import time; time.sleep(600)"],
                        "resources": {"limits": resources, "requests": resources},
                    }
                ],
            },
        },
    )

    def started():
        p = core.read_namespaced_pod("pinned", namespace)
        statuses = p.status.container_statuses or []
        return p if statuses and statuses[0].state.running else None

    pid = pid_of(eventually("the pinned pod to run", started))
    assert started().status.qos_class == "Guaranteed"
    assert len(os.sched_getaffinity(pid)) == 1


def test_cacheserver_statefulset_serves_memcached_sized_from_its_cgroup(
    api, agent, namespace, eventually
):
    """The product's server as the operator will run it: hostNetwork, configured through
    env, `-m auto` from the cgroup limit, Ready from `cacheserver-probe`."""
    if not shutil.which("cacheserver", path=default_path()):
        pytest.skip("cacheserver is not installed in this environment")
    from pymemcache.client.base import Client

    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    port = free_port()
    limit = 128 * 1024 * 1024
    container = {
        "name": "cacheserver",
        "image": "cache-appliance:dev",
        "command": ["cacheserver"],
        "args": ["-m", "auto"],
        "env": [
            {"name": "CACHESERVER_LISTEN",
             "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
            {"name": "CACHESERVER_PORT", "value": str(port)},
            {"name": "CACHESERVER_CONTAINER_MEMORY_LIMIT",
             "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        ],
        "ports": [{"name": "memcache", "containerPort": port}],
        "resources": {"limits": {"memory": str(limit)}},
        "readinessProbe": {"exec": {"command": ["cacheserver-probe"]}, "periodSeconds": 1},
    }  # fmt: skip
    apps.create_namespaced_stateful_set(
        namespace,
        {
            "metadata": {"name": "cache"},
            "spec": {
                "replicas": 2,
                "serviceName": "cache",
                "podManagementPolicy": "Parallel",
                "selector": {"matchLabels": {"app": "cache"}},
                "template": pod_template("cache", container),
            },
        },
    )

    def pods():
        return core.list_namespaced_pod(namespace, label_selector="app=cache").items

    eventually(
        "both cacheserver pods Ready",
        lambda: len(p := pods()) == 2 and all(is_ready(x) for x in p),
        timeout=90,
    )
    for pod in pods():
        mc = Client((pod.status.pod_ip, port), connect_timeout=2, timeout=2)
        try:
            mc.set("where", pod.metadata.name.encode())
            assert mc.get("where") == pod.metadata.name.encode()
            maxbytes = int(mc.stats()[b"limit_maxbytes"])
        finally:
            mc.close()
        assert 0 < maxbytes < limit, f"-m auto gave {maxbytes} bytes under a {limit} limit"


def sleeper(name: str, script: str, **spec) -> dict:
    return {
        "metadata": {"name": name},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {"name": "main", "image": "python:3", "command": ["python3", "-c", script]}
            ],
            **spec,
        },
    }


def test_deletion_escalates_to_sigkill_after_the_grace_period(api, agent, namespace, eventually):
    core = client.CoreV1Api(api)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    core.create_namespaced_pod(
        namespace, sleeper("stubborn", stubborn, terminationGracePeriodSeconds=2)
    )

    def running():
        p = core.read_namespaced_pod("stubborn", namespace)
        statuses = p.status.container_statuses or []
        return p if statuses and statuses[0].state.running else None

    pid = pid_of(eventually("the stubborn pod to run", running))
    core.delete_namespaced_pod("stubborn", namespace)

    def gone() -> bool:
        return not core.list_namespaced_pod(namespace).items

    eventually("the pod object to be removed", gone, timeout=30)
    assert not Path(f"/proc/{pid}").exists(), "SIGTERM was ignored and nothing followed"


def test_restart_policy_never_reports_the_outcome(api, agent, namespace, eventually):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, sleeper("ok", "pass", restartPolicy="Never"))
    core.create_namespaced_pod(
        namespace, sleeper("fails", "raise SystemExit(3)", restartPolicy="Never")
    )

    def phase(name: str) -> str:
        return core.read_namespaced_pod(name, namespace).status.phase

    eventually("pod ok to succeed", lambda: phase("ok") == "Succeeded")
    eventually("pod fails to fail", lambda: phase("fails") == "Failed")
    status = core.read_namespaced_pod("fails", namespace).status.container_statuses[0]
    assert status.state.terminated.exit_code == 3
    assert status.restart_count == 0
