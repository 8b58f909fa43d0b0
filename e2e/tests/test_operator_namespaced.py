"""The chart with `operator.watchNamespaces`: a Role in the watched namespace, a KopfPeering
there, and a ClusterRole only for what has no namespace. An operator with exactly that
runs a CacheCluster in its namespace and may touch nothing elsewhere."""

from __future__ import annotations

import subprocess

from e2e import product
from e2e.appliance import CacheClusters, endpoints, load_manifest, memcached_roundtrip
from e2e.base import wait_for

RELEASE = "cache-operator-ns"  # the chart names its objects and ServiceAccount after it


def test_namespaced_operator_runs_its_namespace_only(
    api, cluster, tools, chart, operator, namespace, tmp_path
):
    # The cluster-wide operator would act on this namespace too: it steps aside meanwhile.
    operator.scale(0)
    try:
        install = product.install_chart(
            cluster.kubeconfig,
            tools,
            chart.image,
            release=RELEASE,
            namespace=namespace,
            values=["--set", f"operator.watchNamespaces={{{namespace}}}"],
        )
    except BaseException:
        operator.scale(1)
        raise
    assert f"watching namespace(s) {namespace}" in install.stdout
    kubeconfig = product.service_account_kubeconfig(
        api, cluster.kubeconfig, tmp_path / "kubeconfig", account=RELEASE, namespace=namespace
    )

    def can(verb: str, resource: str, where: str) -> bool:
        scope = ["-A"] if where == "*" else ["-n", where]
        question = ["auth", "can-i", verb, resource, *scope]
        result = subprocess.run(
            [str(tools / "kubectl"), "--kubeconfig", str(kubeconfig), *question],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.stdout.strip() == "yes"

    assert can("create", "statefulsets.apps", namespace)
    assert can("patch", "kopfpeerings.kopf.dev", namespace)
    assert can("get", "nodes", "*")
    assert not can("create", "statefulsets.apps", "default")
    assert not can("list", "pods", "*")
    assert not can("patch", "cacheclusters.cache.appliance.io", "default")
    assert not can("patch", "clusterkopfpeerings.kopf.dev", "*")

    scoped = product.OperatorPod(api, release=RELEASE, namespace=namespace)
    caches = CacheClusters(api, namespace)
    try:
        scoped.wait_ready()
        manifest = load_manifest(product.EXAMPLE)
        name = manifest["metadata"]["name"]
        caches.create(manifest, replicas=1)
        try:
            status = caches.wait_phase(name, "Ready", 120, replicas=1)
        except Exception as e:
            raise AssertionError(f"{e}\noperator log:\n{scoped.tail()}") from None
        (ep,) = endpoints(status)
        assert memcached_roundtrip(ep, "scoped", b"yes") == b"yes"
        assert "Forbidden" not in scoped.tail(200), scoped.tail(200)
        caches.delete(name)
        wait_for("the namespaced cluster's pods to be gone", lambda: not caches.pods(name), 60)
    finally:
        subprocess.run(
            [str(tools / "helm"), "uninstall", RELEASE, "-n", namespace, "--wait"],
            env=product.helm_env(cluster.kubeconfig, tools),
            capture_output=True,
            timeout=120,
            check=False,
        )
        operator.scale(1)
