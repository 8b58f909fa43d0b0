"""The bottom of the e2e package: where things are, the pinned binaries the control plane and
the nodes run (built by e2e/build-control-plane.sh into a cache outside the repository),
and waiting for something to come up. It imports nothing else of the package, so every
other module may import it."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parent
VERSIONS_FILE = E2E_DIR / "controlplane" / "versions.env"


class ClusterError(RuntimeError):
    pass


def versions() -> dict[str, str]:
    """KEY=value pairs of e2e/controlplane/versions.env (shared with the build script)."""
    result = {}
    for line in VERSIONS_FILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip()
    return result


def cache_dir() -> Path:
    if os.environ.get("E2E_CACHE"):
        return Path(os.environ["E2E_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "cache-appliance"


_VERSION_KEY = {
    "etcd": "ETCD_VERSION",
    "kube-apiserver": "KUBERNETES_VERSION",
    "kube-controller-manager": "KUBERNETES_VERSION",
    "kube-scheduler": "KUBERNETES_VERSION",
    "kubectl": "KUBERNETES_VERSION",
    "helm": "HELM_VERSION",
    "prometheus": "PROMETHEUS_VERSION",
    "kubelet": "KUBERNETES_VERSION",
    "kube-proxy": "KUBERNETES_VERSION",
    "containerd": "CONTAINERD_VERSION",
    "containerd-shim-runc-v2": "CONTAINERD_VERSION",
    "ctr": "CONTAINERD_VERSION",
}


def binary(name: str) -> Path:
    """The cached binary for ``name`` at the pinned version; a clear error if not built."""
    path = cache_dir() / "bin" / f"{name}-{versions()[_VERSION_KEY[name]]}"
    if not os.access(path, os.X_OK):
        raise ClusterError(
            f"{path.name} is not built yet: run `make e2e-bins` (takes a while once)"
        )
    return path


def cni_dir() -> Path:
    """The directory of the cached CNI plugins (ptp, host-local, portmap, loopback)."""
    path = cache_dir() / "bin" / f"cni-{versions()['CNI_PLUGINS_VERSION']}"
    if not os.access(path / "ptp", os.X_OK):
        raise ClusterError(f"{path.name} is not built yet: run `make e2e-bins`")
    return path


def missing_binaries() -> list[str]:
    missing = []
    for name in _VERSION_KEY:
        try:
            binary(name)
        except ClusterError:
            missing.append(name)
    try:
        cni_dir()
    except ClusterError:
        missing.append("cni-plugins")
    return missing


def wait_for(
    what: str,
    check: Callable[[], object],
    timeout: float,
    interval: float = 0.25,
    on_poll: Callable[[], None] | None = None,
) -> object:
    """Poll ``check`` until it returns something truthy; raise ClusterError after ``timeout``.

    ``on_poll`` runs before each try and may raise to stop early (a process died)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        if on_poll:
            on_poll()
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # the thing is not up yet; remember why for the message
            last_error = e
        if time.monotonic() >= deadline:
            why = f" (last error: {last_error})" if last_error else ""
            raise ClusterError(f"timed out after {timeout:.0f}s waiting for {what}{why}")
        time.sleep(interval)
