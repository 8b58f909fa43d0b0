"""Fixtures of the e2e suite: a real control plane (or the cluster named by E2E_KUBECONFIG),
eight real nodes (kubelet, containerd, kube-proxy) in two zones and four racks, the
project's image on every node, the chart installed with the pinned helm, its operator
running as a pod, and a namespace per test."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from e2e import images, nodes, product
from e2e.appliance import GROUP, LABEL_CLUSTER, PLURAL, VERSION, CacheClusters
from e2e.base import ClusterError, binary, missing_binaries, wait_for
from e2e.cluster import ExternalCluster, LocalCluster

START_TIMEOUT = 120.0
# Enough for every placement strategy of examples/: 3 pods in one zone (cluster), 6 on
# distinct hosts (spread), 3 partitions of 2 on racks of their own (partition). Nodes are
# dealt round-robin over the zones, then over 2 racks per zone: 4 racks of 2 nodes.
NODES, ZONES = 8, 2


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster | ExternalCluster]:
    external = os.environ.get("E2E_KUBECONFIG")
    if external:
        yield ExternalCluster(Path(external))
        return
    missing = missing_binaries()
    if missing:
        pytest.skip(f"control-plane binaries not built ({', '.join(missing)}): make e2e-bins")
    # Under pytest's temporary directory: the logs of the last runs stay for a look.
    local = LocalCluster(tmp_path_factory.mktemp("cluster"))
    local.start(timeout=START_TIMEOUT)
    try:
        yield local
    finally:
        local.stop()


@pytest.fixture(scope="session")
def api(cluster):
    client = cluster.api_client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def built_image() -> images.NodeImages:
    """The project's image, built from the Dockerfile (cached by content), and the pause
    image: what every node imports."""
    return images.for_nodes()


@pytest.fixture(scope="session")
def agent(cluster, api, built_image) -> Iterator[nodes.Nodes]:
    """The cluster's real nodes. Tests that look at the pods' processes on this machine use
    it; against an existing cluster (E2E_KUBECONFIG) they are skipped."""
    if isinstance(cluster, ExternalCluster):
        pytest.skip("E2E_KUBECONFIG: the cluster's own nodes run the pods, not this machine")
    specs = nodes.default_nodes(NODES, ZONES)
    running = nodes.Nodes(cluster, specs, cluster.workdir / "nodes")
    running.start(built_image.archives, START_TIMEOUT)
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def shared_cpu_node(agent, built_image) -> Iterator[str]:
    """One more real node, for one test: its kubelet runs no CPU manager policy (`none`, the
    kubelet's default), so every pod there shares every CPU, Guaranteed or not. Tainted
    (nodes.SHARED_CPUS_TAINT) so that only pods tolerating it go there; removed afterwards."""
    spec = nodes.NodeSpec(
        "node-shared-cpus",
        NODES + 1,
        "zone-a",
        "rack-shared",
        cpu_manager_policy="none",
        taints=[nodes.SHARED_CPUS_TAINT],
    )
    agent.add(spec, built_image.archives, START_TIMEOUT)
    try:
        yield spec.name
    finally:
        agent.remove(spec.name)


@pytest.fixture(scope="session")
def tools(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with the pinned kubectl and helm, by those names."""
    missing = [t for t in ("kubectl", "helm") if t in missing_binaries()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not built: make e2e-bins")
    bin_dir = tmp_path_factory.mktemp("bin")
    for tool in ("kubectl", "helm"):
        (bin_dir / tool).symlink_to(binary(tool))
    return bin_dir


@dataclass
class ChartInstall:
    output: str  # what `helm upgrade --install` printed, NOTES included
    image: str  # the image the chart runs


@pytest.fixture(scope="session")
def chart(cluster, agent, tools, built_image) -> ChartInstall:
    """The chart installed as a user would (release cache-operator in cache-system), with
    the project's image: done when the operator's pod is Ready."""
    result = product.install_chart(cluster.kubeconfig, tools, built_image.ref)
    return ChartInstall(result.stdout, built_image.ref)


@pytest.fixture(scope="session")
def operator(cluster, api, chart) -> product.OperatorPod:
    """The chart's operator pod, authenticated by its mounted ServiceAccount token."""
    running = product.OperatorPod(api)
    running.wait_ready()
    return running


@pytest.fixture
def namespace(api) -> Iterator[str]:
    from kubernetes import client

    core = client.CoreV1Api(api)
    name = f"e2e-{secrets.token_hex(3)}"
    core.create_namespace({"metadata": {"name": name}})
    # Pods are admitted only once the namespace's default service account exists.
    wait_for(
        f"service account default in {name}",
        lambda: core.read_namespaced_service_account("default", name),
        30,
    )
    yield name
    core.delete_namespace(name)


@pytest.fixture
def caches(api, operator, namespace) -> Iterator[CacheClusters]:
    """CacheClusters in the test's namespace, with the operator running. Afterwards the
    clusters left are deleted and their pods waited out: the next test's pods need the
    same host ports on the same nodes."""
    clusters = CacheClusters(api, namespace)
    yield clusters
    listing = clusters.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    for item in listing["items"]:
        clusters.delete(item["metadata"]["name"])
    wait_for(
        f"the cache pods of namespace {namespace} to be gone",
        lambda: (
            not clusters.core.list_namespaced_pod(namespace, label_selector=LABEL_CLUSTER).items
        ),
        90,
    )


@pytest.fixture
def eventually() -> Callable:
    """eventually(what, check, timeout=60): poll until check() is truthy, else fail naming it."""

    def wait(what: str, check: Callable[[], object], timeout: float = 60.0) -> object:
        try:
            return wait_for(what, check, timeout, interval=0.2)
        except ClusterError as e:
            pytest.fail(str(e))

    return wait


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, attach the tails of the control plane's logs to the report."""
    report = yield
    if report.failed and "cluster" in item.fixturenames:
        ns, api = item.funcargs.get("namespace"), item.funcargs.get("api")
        if ns and api:
            report.sections.append((f"namespace {ns}", describe_namespace(api, ns)))
        local = item.funcargs.get("cluster")
        if isinstance(local, LocalCluster):
            report.sections.append(("control-plane logs", local.failure_report(15)))
        running_nodes = item.funcargs.get("agent")
        if isinstance(running_nodes, nodes.Nodes) and not running_nodes.alive():
            report.sections.append(("node logs", running_nodes.failure_report(15)))
        running = item.funcargs.get("operator")
        if isinstance(running, product.OperatorPod):
            report.sections.append(("operator log", running.tail(40)))
    return report


def describe_namespace(api, namespace: str) -> str:
    """Pods with their container states, and events: what `kubectl describe` would tell."""
    from kubernetes import client

    core = client.CoreV1Api(api)
    lines = []
    try:
        for pod in core.list_namespaced_pod(namespace).items:
            lines.append(f"pod {pod.metadata.name} on {pod.spec.node_name}: {pod.status.phase}")
            for cs in pod.status.container_statuses or []:
                lines.append(
                    f"  {cs.name} ready={cs.ready} restarts={cs.restart_count} "
                    f"state={cs.state.to_dict()}"
                )
        for ev in core.list_namespaced_event(namespace).items:
            lines.append(f"event {ev.involved_object.name}: {ev.reason}: {ev.message}")
    except Exception as e:
        lines.append(f"(could not describe: {e})")
    return "\n".join(lines)
