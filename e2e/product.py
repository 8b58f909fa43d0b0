"""The product on the e2e cluster: the chart installed with the pinned helm, and the operator
running beside the cluster as the chart's ServiceAccount.

Why beside and not as the chart's Deployment: the node agent runs containers' commands as
local processes, without images, volumes or service-account token mounts, so the operator's
pod would have no credentials (and no image to run). The chart is installed as a user would
install it, with one value changed: a nodeSelector that no node has, so the Deployment's pod
stays Pending instead of running without credentials. The operator process then gets a token
for the chart's ServiceAccount from the TokenRequest API, as the kubelet would for the pod,
so everything it does is checked against the chart's RBAC and nothing more.

Used by the e2e fixtures (e2e/tests/conftest.py) and by `make up` (`install`, `stop`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2e import procs
from e2e.cluster import REPO_ROOT, ClusterError, free_port, wait_for

CHART = REPO_ROOT / "charts" / "cache-operator"
EXAMPLES = REPO_ROOT / "examples"
EXAMPLE = EXAMPLES / "cachecluster.yaml"
RELEASE = "cache-operator"
NAMESPACE = "cache-system"
# The chart names its ServiceAccount and peering object after the release.
SERVICE_ACCOUNT = RELEASE
PEERING = RELEASE
# The label no node carries: the chart's Deployment pod stays Pending (see the docstring).
NO_NODE_SELECTOR = {"e2e.cache.appliance.io/runs-operator-pods": "never"}
APPLIANCE_IMAGE = "cache-appliance:e2e"  # the node agent runs `command`, never the image
POD_ID = "cache-operator-beside-the-cluster"


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
    liveness_url: str,
    timeout: float = 120,
    release: str = RELEASE,
    namespace: str = NAMESPACE,
    values: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """`helm upgrade --install` the chart (by default as release cache-operator in
    cache-system), plus ``values`` (helm flags such as --set).

    No --wait: the Deployment's pod cannot become ready here (see the module docstring).
    `helm test` asks ``liveness_url``, the operator beside the cluster."""
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
            "--set-json",
            f"nodeSelector={json.dumps(NO_NODE_SELECTOR)}",
            "--set",
            f"tests.url={liveness_url}",
            *values,
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


@dataclass
class OperatorPorts:
    liveness: int
    metrics: int

    @classmethod
    def pick(cls) -> OperatorPorts:
        return cls(free_port(), free_port())

    @property
    def liveness_url(self) -> str:
        return f"http://127.0.0.1:{self.liveness}/healthz"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics}/metrics"


def operator_command() -> list[str]:
    """The `cacheoperator` console script of this environment (the virtualenv's)."""
    beside = Path(sys.executable).parent / "cacheoperator"
    found = str(beside) if beside.exists() else shutil.which("cacheoperator")
    if not found:
        raise ClusterError("cacheoperator is not installed: run scripts/bootstrap.sh")
    return [found]


class OperatorProcess:
    """`cacheoperator` as the Deployment runs it (all namespaces, peering, liveness,
    metrics), on loopback ports, with the ServiceAccount's kubeconfig."""

    def __init__(
        self,
        kubeconfig: Path,
        log: Path,
        ports: OperatorPorts,
        detached: bool,
        namespaces: Sequence[str] = (),
        pod_id: str = POD_ID,
    ) -> None:
        """``namespaces``: watch these (as the chart's operator.watchNamespaces), else all."""
        self.kubeconfig = kubeconfig
        self.log = log
        self.ports = ports
        self.detached = detached
        self.namespaces = list(namespaces)
        self.pod_id = pod_id
        self.record: procs.ProcessRecord | None = None
        self._popen: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        argv = [
            *operator_command(),
            *([f"--namespace={ns}" for ns in self.namespaces] or ["--all-namespaces"]),
            f"--peering={PEERING}",
            f"--liveness={self.ports.liveness_url}",
            f"--metrics-port={self.ports.metrics}",
            "--metrics-address=127.0.0.1",
            f"--default-image={APPLIANCE_IMAGE}",
        ]
        if not self.detached and shutil.which("setpriv"):
            # Killed with the test run, however it ends (as the control plane is).
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        return argv

    def start(self, timeout: float = 60) -> OperatorProcess:
        env = {
            "KUBECONFIG": str(self.kubeconfig),
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "HOME": str(self.kubeconfig.parent),
            "PYTHONUNBUFFERED": "1",
            # kopf's peering identity, stable across restarts as the chart's pod name is
            # (see the Deployment): a restarted operator does not wait for its own old
            # keep-alive to expire.
            "POD_ID": self.pod_id,
        }
        self.record, self._popen = procs.start("cacheoperator", self.argv(), self.log, env=env)
        self.wait_live(timeout)
        return self

    def alive(self) -> bool:
        return self.record is not None and self.record.alive()

    def live(self) -> bool:
        """kopf answers its liveness endpoint once it has logged in and is watching."""
        with urllib.request.urlopen(self.ports.liveness_url, timeout=2) as reply:
            return reply.status == 200

    def wait_live(self, timeout: float) -> None:
        def check_alive() -> None:
            if not self.alive():
                raise ClusterError(
                    f"cacheoperator exited during start-up; its log:\n{procs.tail(self.log)}"
                )

        wait_for(
            f"the operator's liveness endpoint {self.ports.liveness_url}",
            self.live,
            timeout,
            on_poll=check_alive,
        )

    def stop(self, grace: float = 10) -> None:
        if self.record is not None:
            self.record.stop(grace, self._popen)

    def pause(self) -> None:
        """SIGSTOP: frozen where it is, in the middle of whatever it was doing."""
        assert self.record is not None
        os.killpg(self.record.pid, signal.SIGSTOP)

    def kill(self) -> None:
        """SIGKILL: the operator gets no chance to finish what it was doing."""
        assert self.record is not None
        os.killpg(self.record.pid, signal.SIGKILL)
        wait_for("the killed operator to be gone", lambda: not self.alive(), 10)
        if self._popen is not None:
            self._popen.wait(timeout=5)

    def tail(self, lines: int = 40) -> str:
        return procs.tail(self.log, lines)


# ---- `make up` / `make down` -----------------------------------------------------------


def install(cluster, state_dir: Path, timeout: float = 180) -> None:
    """After the nodes are Ready: install the chart, run the operator in the background
    (its record in <state_dir>/operator.json for `make down`), apply the example and wait
    for it to be Ready; then print its endpoints."""
    from e2e.appliance import describe_endpoints, load_manifest, wait_phase

    bin_dir = state_dir / "bin"
    ports = OperatorPorts.pick()
    print(f"installing {CHART.relative_to(REPO_ROOT)} as release {RELEASE} ...", flush=True)
    install_chart(cluster.kubeconfig, bin_dir, ports.liveness_url, timeout)
    api = cluster.api_client()
    kubeconfig = service_account_kubeconfig(
        api, cluster.kubeconfig, state_dir / "operator.kubeconfig", hours=24 * 7
    )
    print("starting the operator as the chart's ServiceAccount ...", flush=True)
    operator = OperatorProcess(kubeconfig, state_dir / "operator.log", ports, detached=True)
    operator.start(timeout)
    assert operator.record is not None
    (state_dir / "operator.json").write_text(json.dumps(operator.record.to_dict()))

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


def operator_record(state_dir: Path) -> procs.ProcessRecord | None:
    record_file = state_dir / "operator.json"
    if not record_file.exists():
        return None
    return procs.ProcessRecord.from_dict(json.loads(record_file.read_text()))


def stop(state_dir: Path) -> None:
    """Stop the operator `install` started, if it runs (SIGTERM: kopf leaves its peering)."""
    record = operator_record(state_dir)
    if record is not None:
        record.stop(grace=10)
        (state_dir / "operator.json").unlink()
