"""What `make up` installs into the local cluster once the control plane and nodes run.

THE HOOK for the product: when the chart (charts/cache-operator) and the example
(examples/cachecluster.yaml) exist, `make up` installs the chart with the pinned helm and
applies the example. Still to come, and where it goes:
  1. the chart's CRDs and RBAC: `helm upgrade --install` below does it;
  2. the operator: its Deployment needs in-cluster credentials the node agent cannot mount
     yet (no volumes), so for now run it beside the cluster:
        KUBECONFIG=.e2e/cluster/kubeconfig .venv/bin/cacheoperator
     (install the chart with --set operator.enabled=false or the equivalent value);
  3. the example CacheCluster: applied below; its pods run on the agent's nodes.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from e2e.cluster import REPO_ROOT

CHART = REPO_ROOT / "charts" / "cache-operator"
EXAMPLE = REPO_ROOT / "examples" / "cachecluster.yaml"
RELEASE = "cache-operator"
NAMESPACE = "cache-system"


def install(kubeconfig: Path, bin_dir: Path, timeout: float = 300) -> None:
    env = {"KUBECONFIG": str(kubeconfig), "PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": "/tmp"}
    if not (CHART / "Chart.yaml").exists():
        print("no chart yet (charts/cache-operator): the cluster has nodes but no operator")
        return
    print(f"installing {CHART.relative_to(REPO_ROOT)} as release {RELEASE} ...", flush=True)
    subprocess.run(
        [
            str(bin_dir / "helm"),
            "upgrade",
            "--install",
            RELEASE,
            str(CHART),
            "--namespace",
            NAMESPACE,
            "--create-namespace",
            "--wait",
            f"--timeout={timeout:.0f}s",
        ],
        env=env,
        check=True,
        timeout=timeout + 30,
    )
    if EXAMPLE.exists():
        print(f"applying {EXAMPLE.relative_to(REPO_ROOT)} ...", flush=True)
        subprocess.run(
            [str(bin_dir / "kubectl"), "apply", "-f", str(EXAMPLE)],
            env=env,
            check=True,
            timeout=60,
        )
