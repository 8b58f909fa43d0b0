"""The e2e cluster's nodes are real: kubelets with containerd and runc, each node in a
network namespace of its own with its own address, zone and rack labels and the static CPU
manager; pods run the project's image, get their downward-API env and cgroup limits from the
kubelet, turn Ready from their own probes, are restarted when killed, stopped when deleted,
and reach Services through kube-proxy."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from e2e.appliance import is_ready, pid_of, process_env
from e2e.base import binary, wait_for
from e2e.nodes import (
    NETWORK_PREFIX,
    RACK_LABEL,
    SHARED_CPUS_TAINT,
    ZONE_LABEL,
    container_cgroup,
)
from testkit.net import free_port

HOST_IP_ENV = {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}}


@pytest.fixture
def image(built_image) -> str:
    return built_image.ref


def web_container(image: str, port: int, probe: dict | None = None, memory: str = "64Mi") -> dict:
    """python3's http.server bound to the node's address, the way a hostNetwork pod binds."""
    container = {
        "name": "web",
        "image": image,
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


def accepts(address: str, port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((address, port), timeout=1):
        return True
    return False


def sleeper(image: str, name: str, script: str, resources: dict | None = None, **spec) -> dict:
    """A hostNetwork pod running ``script`` in the image's python3; with ``resources`` as
    both its requests and limits (Guaranteed, for integer CPUs)."""
    container: dict = {"name": "main", "image": image, "command": ["python3", "-c", script]}
    if resources:
        container["resources"] = {"limits": resources, "requests": resources}
    return {
        "metadata": {"name": name},
        "spec": {"hostNetwork": True, "containers": [container], **spec},
    }


SLEEP = "import time; time.sleep(600)"


def kubectl(cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [str(binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=check)


def _lease(leases, name: str):
    with contextlib.suppress(ApiException):
        return leases.read_namespaced_lease(name, "kube-node-lease")
    return None


def test_nodes_are_kubelets_on_containerd_with_topology_and_heartbeats(api, agent, eventually):
    """What `kubectl get nodes -o wide` shows: kubelet v1.36, containerd 2, an address of
    each node's own (not loopback), zone and rack labels; and fresh Leases."""
    core = client.CoreV1Api(api)
    nodes = {n.metadata.name: n for n in core.list_node().items}
    assert sorted(nodes) == sorted(s.name for s in agent.specs)
    assert {n.metadata.labels[ZONE_LABEL] for n in nodes.values()} == {"zone-a", "zone-b"}
    assert len({n.metadata.labels[RACK_LABEL] for n in nodes.values()}) == 4
    addresses = set()
    leases = client.CoordinationV1Api(api)
    for name, node in nodes.items():
        info = node.status.node_info
        assert info.kubelet_version.startswith("v1.36."), info.kubelet_version
        assert info.container_runtime_version.startswith("containerd://2."), info
        assert node.metadata.labels["kubernetes.io/hostname"] == name
        internal = {a.type: a.address for a in node.status.addresses}["InternalIP"]
        assert internal.startswith(NETWORK_PREFIX + "."), internal
        addresses.add(internal)
        assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"
        # 100m kube-reserved (which the static CPU manager rounds up to CPU 0 for the shared
        # pool): one whole CPU left to hand out exclusively here.
        capacity = int(node.status.capacity["cpu"])
        assert node.status.allocatable["cpu"] == f"{capacity * 1000 - 100}m"
        # The kubelet's first lease may come a moment after its node turned Ready.
        lease = eventually(f"the lease of {name}", lambda n=name: _lease(leases, n), 30)
        assert lease.spec.holder_identity == name
        age = datetime.now(UTC) - lease.spec.renew_time
        assert age.total_seconds() < 40, f"lease of {name} is {age} old"
    assert len(addresses) == len(nodes)


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
                    "template": pod_template("bad", web_container("unused", free_port())),
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

        wait_for("the Widget CRD to be served", established, 30)
        with pytest.raises(ApiException) as invalid:
            create(5, 3, "bad")
        assert invalid.value.status == 422
        assert "minReplicas must not exceed maxReplicas" in invalid.value.body
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")


def test_deployment_is_scheduled_runs_and_is_ready_only_from_its_probe(
    api, cluster, agent, namespace, eventually, image
):
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    port = free_port()
    probe = {
        "exec": {"command": ["test", "-f", "/tmp/ready"]},
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
                "template": pod_template("web", web_container(image, port, probe)),
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

    eventually("both web pods to serve on their node's address", serving, timeout=90)
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

    # kubectl exec, through the API server and the kubelet, makes the probe pass.
    for pod in running:
        kubectl(cluster, "exec", "-n", namespace, pod.metadata.name, "--", "touch", "/tmp/ready")
    eventually("both pods Ready from their probe", lambda: all(is_ready(p) for p in pods()))
    eventually(
        "the deployment to count 2 ready replicas",
        lambda: apps.read_namespaced_deployment("web", namespace).status.ready_replicas == 2,
    )
    for pod in running:
        kubectl(cluster, "exec", "-n", namespace, pod.metadata.name, "--", "rm", "/tmp/ready")
    eventually("both pods NotReady again", lambda: not any(is_ready(p) for p in pods()))
    # kubectl logs, through the kubelet: http.server logged its requests.
    logs = kubectl(cluster, "logs", "-n", namespace, running[0].metadata.name).stdout
    assert "GET / " in logs or "Serving HTTP" in logs, logs

    apps.delete_namespaced_deployment("web", namespace)
    eventually("the pods to be deleted", lambda: not pods())
    for pod in running:
        assert not accepts(pod.status.pod_ip, port), "the process outlived its pod"


def test_pod_gets_its_cgroup_limit_and_downward_api_env(api, agent, namespace, eventually, image):
    core = client.CoreV1Api(api)
    limit = 96 * 1024 * 1024
    pod = {
        "metadata": {"name": "sized", "labels": {"tier": "cache"}},
        "spec": {
            "hostNetwork": True,
            "containers": [
                {
                    "name": "main",
                    "image": image,
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

    running = eventually("the pod's process to run", started, timeout=90)
    pid = pid_of(running)
    environ = process_env(pid)
    assert environ["POD_NAME"] == "sized"
    assert environ["TIER"] == "cache"
    assert environ["NODE_NAME"] == running.spec.node_name
    assert environ["MEMORY_LIMIT"] == str(limit)
    assert environ["MEMORY_LIMIT_MI"] == "96"
    assert environ["GREETING"] == "hello sized"
    argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")[:-1]
    assert argv[-4:] == ["sized", str(limit), "$(POD_NAME)", "$(UNKNOWN)"]

    cgroup = container_cgroup(running)
    limit_file = next(
        f for f in (cgroup / "memory.limit_in_bytes", cgroup / "memory.max") if f.exists()
    )
    assert int(limit_file.read_text()) == limit, f"{limit_file} is not the pod's limit"

    core.delete_namespaced_pod("sized", namespace, grace_period_seconds=1)
    eventually("the pod's process to stop", lambda: not Path(f"/proc/{pid}").exists())


def test_killed_process_is_restarted_and_counted(api, agent, namespace, eventually, image):
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
                "template": pod_template("cache", web_container(image, port, probe)),
            },
        },
    )

    def pod():
        with contextlib.suppress(ApiException):
            return core.read_namespaced_pod("cache-0", namespace)
        return None

    first = eventually("cache-0 to be Ready", lambda: (p := pod()) and is_ready(p) and p, 90)
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


def test_guaranteed_pod_gets_the_cpu_the_kubelet_reserved_for_it(
    api, agent, namespace, eventually, image
):
    """The static CPU manager gives a Guaranteed integer-CPU container a CPU of its own: its
    process may run there only, and the kubelet's checkpoint names that CPU for it."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU: nothing to pin exclusively")
    core = client.CoreV1Api(api)
    resources = {"cpu": "1", "memory": "64Mi"}
    core.create_namespaced_pod(namespace, sleeper(image, "pinned", SLEEP, resources))

    def started():
        p = core.read_namespaced_pod("pinned", namespace)
        statuses = p.status.container_statuses or []
        return p if statuses and statuses[0].state.running else None

    pod = eventually("the pinned pod to run", started, timeout=90)
    assert pod.status.qos_class == "Guaranteed"
    cpus = os.sched_getaffinity(pid_of(pod))
    assert cpus == {1}, f"CPU 0 is reserved; the one CPU to give is 1, got {cpus}"
    checkpoint = agent.node(pod.spec.node_name).paths.kubelet_root / "cpu_manager_state"
    state = json.loads(checkpoint.read_text())
    assert state["policyName"] == "static"
    assert state["entries"][pod.metadata.uid]["main"] == "1", state


def test_a_node_without_the_static_cpu_manager_shares_every_cpu(
    api, shared_cpu_node, namespace, eventually, image
):
    """The same Guaranteed pod on a kubelet with cpuManagerPolicy none may run on every CPU:
    what an appliance gets when its node ignores pinning (the operator's Pinned condition
    must tell that apart)."""
    core = client.CoreV1Api(api)
    resources = {"cpu": "1", "memory": "64Mi"}
    unpinned = sleeper(
        image,
        "unpinned",
        SLEEP,
        resources,
        nodeSelector={"kubernetes.io/hostname": shared_cpu_node},
        tolerations=[{"key": SHARED_CPUS_TAINT["key"], "operator": "Exists"}],
    )
    core.create_namespaced_pod(namespace, unpinned)

    def started():
        p = core.read_namespaced_pod("unpinned", namespace)
        statuses = p.status.container_statuses or []
        return p if statuses and statuses[0].state.running else None

    pod = eventually("the pod on the shared-CPU node to run", started, timeout=90)
    assert pod.status.qos_class == "Guaranteed"
    assert os.sched_getaffinity(pid_of(pod)) == os.sched_getaffinity(0)
    node = core.read_node(shared_cpu_node)
    assert [t.key for t in node.spec.taints or []] == [SHARED_CPUS_TAINT["key"]]


def test_pods_reach_services_through_kube_proxy(api, agent, namespace, eventually, image):
    """A pod on the pod network (not hostNetwork) reaches a ClusterIP Service whose
    endpoint is a hostNetwork pod on another node, and the API server's `kubernetes`
    Service; and this machine reaches the pod's own address."""
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    port = free_port()
    apps.create_namespaced_deployment(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": {"app": "web"}},
                "template": pod_template("web", web_container(image, port)),
            },
        },
    )
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": port}]},
        },
    )
    # kube-proxy on the client's node programs a new Service a moment after its
    # EndpointSlice is ready (until then the ClusterIP is unreachable here): retry a while.
    script = (
        "import socket, sys, time, urllib.request\n"
        "deadline = time.monotonic() + 30\n"
        "while True:\n"
        "    try:\n"
        "        status = urllib.request.urlopen(sys.argv[1], timeout=5).status\n"
        "        break\n"
        "    except OSError:\n"
        "        if time.monotonic() > deadline:\n"
        "            raise\n"
        "        time.sleep(1)\n"
        "print(status)\n"
        "s = socket.create_connection((sys.argv[2], 443), timeout=5); print('api ok')\n"
    )
    service_ip = core.read_namespaced_service("web", namespace).spec.cluster_ip
    api_ip = core.read_namespaced_service("kubernetes", "default").spec.cluster_ip

    def endpoints_ready():
        slices = (
            client.DiscoveryV1Api(api)
            .list_namespaced_endpoint_slice(
                namespace, label_selector="kubernetes.io/service-name=web"
            )
            .items
        )
        return any(e.conditions.ready for s in slices for e in s.endpoints or [])

    eventually("the Service's EndpointSlice to list the web pod", endpoints_ready, timeout=90)
    core.create_namespaced_pod(
        namespace,
        {
            "metadata": {"name": "client"},
            "spec": {
                "restartPolicy": "Never",
                "containers": [
                    {
                        "name": "main",
                        "image": image,
                        "command": ["python3", "-c", script, f"http://{service_ip}/", api_ip],
                    }
                ],
            },
        },
    )

    def phase() -> str:
        return core.read_namespaced_pod("client", namespace).status.phase

    eventually("the client pod to finish", lambda: phase() in ("Succeeded", "Failed"), 90)
    logs = core.read_namespaced_pod_log("client", namespace)
    assert phase() == "Succeeded", logs
    assert logs.split() == ["200", "api", "ok"], logs
    pod_ip = core.read_namespaced_pod("client", namespace).status.pod_ip
    assert pod_ip and not pod_ip.startswith(NETWORK_PREFIX + "."), "not on the pod network"


def test_deletion_escalates_to_sigkill_after_the_grace_period(
    api, agent, namespace, eventually, image
):
    core = client.CoreV1Api(api)
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    core.create_namespaced_pod(
        namespace, sleeper(image, "stubborn", stubborn, terminationGracePeriodSeconds=2)
    )

    def running():
        p = core.read_namespaced_pod("stubborn", namespace)
        statuses = p.status.container_statuses or []
        return p if statuses and statuses[0].state.running else None

    pid = pid_of(eventually("the stubborn pod to run", running, timeout=90))
    core.delete_namespaced_pod("stubborn", namespace)

    def gone() -> bool:
        return not core.list_namespaced_pod(namespace).items

    eventually("the pod object to be removed", gone, timeout=30)
    assert not Path(f"/proc/{pid}").exists(), "SIGTERM was ignored and nothing followed"


def test_restart_policy_never_reports_the_outcome(api, agent, namespace, eventually, image):
    core = client.CoreV1Api(api)
    core.create_namespaced_pod(namespace, sleeper(image, "ok", "pass", restartPolicy="Never"))
    core.create_namespaced_pod(
        namespace, sleeper(image, "fails", "raise SystemExit(3)", restartPolicy="Never")
    )

    def phase(name: str) -> str:
        return core.read_namespaced_pod(name, namespace).status.phase

    eventually("pod ok to succeed", lambda: phase("ok") == "Succeeded", 90)
    eventually("pod fails to fail", lambda: phase("fails") == "Failed")
    status = core.read_namespaced_pod("fails", namespace).status.container_statuses[0]
    assert status.state.terminated.exit_code == 3
    assert status.restart_count == 0
