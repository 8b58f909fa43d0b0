"""The product on the e2e cluster, installed as a user installs it: the project's image
imported into every node's containerd (there is no registry here), the chart installed with
the pinned helm, and the chart's Deployment running the operator on a node with its mounted
ServiceAccount token, so everything it does is checked against the chart's RBAC.

Used by the e2e fixtures (e2e/tests/conftest.py) and by `make up` (`install`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import yaml

from e2e.appliance import describe_endpoints, load_manifest, wait_phase
from e2e.base import REPO_ROOT, ClusterError, wait_for
from e2e.nodes import container_main_pid

CHART = REPO_ROOT / "charts" / "cache-operator"
EXAMPLES = REPO_ROOT / "examples"
EXAMPLE = EXAMPLES / "cachecluster.yaml"
RELEASE = "cache-operator"
NAMESPACE = "cache-system"
# The chart names its ServiceAccount and peering object after the release.
SERVICE_ACCOUNT = RELEASE
PEERING = RELEASE
# The chart's default metrics port (values.yaml metrics.port).
OPERATOR_METRICS_PORT = 9160


def helm_env(kubeconfig: Path, bin_dir: Path) -> dict[str, str]:
    # helm keeps caches and its registry config under HOME; nothing of the user's is read.
    home = kubeconfig.parent / "helm-home"
    return {
        "KUBECONFIG": str(kubeconfig),
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(home),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def run_tool(
    argv: Sequence[str], env: dict[str, str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run helm or kubectl; a failure raises ClusterError with what the tool said."""
    proc = subprocess.run(
        list(argv), env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise ClusterError(
            f"{' '.join(argv[:3])} ... failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
        )
    return proc


def install_chart(
    kubeconfig: Path,
    bin_dir: Path,
    image: str,
    timeout: float = 180,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    values: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`helm upgrade --install --wait` the chart (by default as release cache-operator in
    cache-system) with the project's ``image`` (repository:tag), plus ``values`` (helm flags
    such as --set): done when the operator's pod is Ready."""
    repository, _, tag = image.rpartition(":")
    return run_tool(
        [
            str(bin_dir / "helm"),
            "upgrade",
            "--install",
            release,
            str(CHART),
            "--namespace",
            namespace,
            "--create-namespace",
            "--set",
            f"image.repository={repository}",
            "--set",
            f"image.tag={tag}",
            *values,
            "--wait",
            f"--timeout={timeout:.0f}s",
        ],
        helm_env(kubeconfig, bin_dir),
        timeout=timeout + 30,
    )


def service_account_kubeconfig(
    api_client,
    admin_kubeconfig: Path,
    path: Path,
    hours: float = 2,
    account: str = SERVICE_ACCOUNT,
    namespace: str = NAMESPACE,
) -> Path:
    """A kubeconfig that authenticates as the chart's ServiceAccount, with a bound token
    from the TokenRequest API (what the kubelet would mount into the operator's pod)."""
    from kubernetes import client

    def token() -> str:
        return (
            client.CoreV1Api(api_client)
            .create_namespaced_service_account_token(
                account,
                namespace,
                {"spec": {"expirationSeconds": int(hours * 3600)}},
            )
            .status.token
        )

    # The ServiceAccount was just created by helm: the token request may need a moment.
    value = wait_for(f"a token for ServiceAccount {namespace}/{account}", token, 30)
    admin = yaml.safe_load(admin_kubeconfig.read_text())
    context = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])
    cluster = next(c for c in admin["clusters"] if c["name"] == context["context"]["cluster"])
    user = f"system:serviceaccount:{namespace}:{account}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": user, "user": {"token": value}}],
        "contexts": [
            {
                "name": "operator",
                "context": {"cluster": cluster["name"], "user": user, "namespace": namespace},
            }
        ],
        "current-context": "operator",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


class OperatorPod:
    """The chart's operator: the Deployment's one pod, running the project's image on a node,
    with the ServiceAccount token the kubelet mounted. The tests look at it as a user would
    (its pod, its logs, its metrics) and reach its process on this machine only to freeze or
    kill it as a fault."""

    def __init__(self, api_client, release: str = RELEASE, namespace: str = NAMESPACE) -> None:
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.apps = client.AppsV1Api(api_client)
        self.release = release
        self.namespace = namespace
        self.selector = f"app.kubernetes.io/instance={release},app.kubernetes.io/component=operator"

    def pod(self):
        """The operator's pod that is not being deleted; ClusterError if there is none."""
        pods = [
            p
            for p in self.core.list_namespaced_pod(
                self.namespace, label_selector=self.selector
            ).items
            if p.metadata.deletion_timestamp is None
        ]
        if len(pods) != 1:
            raise ClusterError(f"expected one operator pod, found {len(pods)}")
        return pods[0]

    def ready(self) -> bool:
        pod = self.pod()
        statuses = pod.status.container_statuses or []
        return bool(statuses) and all(s.ready for s in statuses)

    def wait_ready(self, timeout: float = 120) -> None:
        wait_for(f"the operator pod of release {self.release} to be Ready", self.ready, timeout)

    def restart_count(self) -> int:
        return sum(s.restart_count for s in self.pod().status.container_statuses or [])

    def pid(self) -> int:
        """The operator's process on this machine (its container's first process)."""
        return container_main_pid(self.pod())

    @property
    def metrics_url(self) -> str:
        return f"http://{self.pod().status.pod_ip}:{OPERATOR_METRICS_PORT}/metrics"

    def scale(self, replicas: int, timeout: float = 120) -> None:
        """Scale the Deployment; with 0, wait until its pod is gone, else until Ready."""
        name = self.release
        self.apps.patch_namespaced_deployment_scale(
            name, self.namespace, {"spec": {"replicas": replicas}}
        )
        if replicas == 0:
            wait_for(
                f"the operator pods of {name} to be gone",
                lambda: (
                    not self.core.list_namespaced_pod(
                        self.namespace, label_selector=self.selector
                    ).items
                ),
                timeout,
            )
        else:
            self.wait_ready(timeout)

    def pause(self) -> None:
        """SIGSTOP: frozen where it is, in the middle of whatever it was doing."""
        os.kill(self.pid(), signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL (the pod stays; the kubelet starts the container again)."""
        pid = self.pid()
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)

    def tail(self, lines: int = 40) -> str:
        try:
            pod = self.pod()
            return self.core.read_namespaced_pod_log(
                pod.metadata.name, self.namespace, tail_lines=lines
            )
        except Exception as e:
            return f"(no operator log: {e})"


# ---- `make up` / `make down` -----------------------------------------------------------


def install(cluster, state_dir: Path, image: str, timeout: float = 180) -> None:
    """After the nodes are Ready (the image imported): install the chart, wait for the
    operator's pod, apply the example and wait for it to be Ready; print its endpoints."""
    bin_dir = state_dir / "bin"
    print(f"installing {CHART.relative_to(REPO_ROOT)} as release {RELEASE} ...", flush=True)
    started = time.monotonic()
    install_chart(cluster.kubeconfig, bin_dir, image, timeout)
    api = cluster.api_client()
    operator = OperatorPod(api)
    pod = operator.pod()
    print(
        f"operator pod {pod.metadata.name} Ready on {pod.spec.node_name} "
        f"in {time.monotonic() - started:.1f}s",
        flush=True,
    )
    print(f"applying {EXAMPLE.relative_to(REPO_ROOT)} ...", flush=True)
    run_tool(
        [str(bin_dir / "kubectl"), "apply", "-f", str(EXAMPLE)],
        helm_env(cluster.kubeconfig, bin_dir),
    )
    manifest = load_manifest(EXAMPLE)
    name = manifest["metadata"]["name"]
    started = time.monotonic()
    try:
        status = wait_phase(api, "default", name, "Ready", timeout)
    except ClusterError as e:
        raise ClusterError(f"{e}\noperator log:\n{operator.tail()}") from None
    print(f"CacheCluster {name} Ready in {time.monotonic() - started:.1f}s")
    print(describe_endpoints(name, status))
