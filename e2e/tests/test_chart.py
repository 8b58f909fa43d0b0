"""The chart (charts/cache-operator): it lints clean, its values are checked by its schema,
what it renders is accepted by a real API server, `helm install` puts in place what the
operator needs, and its ServiceAccount may do what docs/operator.md lists and no more."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from kubernetes import client

from e2e import product
from e2e.appliance import process_env
from e2e.base import versions

CHART = str(product.CHART)
# Value sets the tests render: the defaults, and the variants that change which objects
# the chart makes (namespaced RBAC and peering, metrics off, an existing ServiceAccount).
VARIANTS: dict[str, list[str]] = {
    "defaults": [],
    "namespaced": ["--set", "operator.watchNamespaces={default,kube-public}"],
    "metrics-off": ["--set", "metrics.enabled=false", "--set", "operator.verbose=true"],
    "own-service-account": [
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=default",
        "--set",
        "operator.peering.create=false",
    ],
}


def helm(tools: Path, *args: str, kubeconfig: Path | None = None, check: bool = True):
    env = product.helm_env(kubeconfig or tools / "no-kubeconfig", tools)
    return subprocess.run(
        [str(tools / "helm"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=check,
    )


def kubectl(tools: Path, kubeconfig: Path, *args: str, stdin: str | None = None):
    return subprocess.run(
        [str(tools / "kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def render(tools: Path, *values: str) -> str:
    kube = versions()["KUBERNETES_VERSION"]
    return helm(
        tools,
        "template",
        product.RELEASE,
        CHART,
        "--namespace",
        product.NAMESPACE,
        "--kube-version",
        kube,
        *values,
    ).stdout


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_chart_lints_clean_in_strict_mode(tools, variant):
    result = helm(tools, "lint", "--strict", CHART, *VARIANTS[variant], check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[WARNING]" not in result.stdout and "[ERROR]" not in result.stdout, result.stdout


def test_chart_crds_are_the_generated_ones():
    """The chart ships crds/ as `make crds` writes them, never a hand-edited copy."""
    chart_crds = product.CHART / "crds"
    shipped = {p.name: p.read_text() for p in (product.REPO_ROOT / "crds").glob("*.yaml")}
    in_chart = {p.name: p.read_text() for p in chart_crds.glob("*.yaml")}
    assert in_chart == shipped, "charts/cache-operator/crds differs from crds/: run `make crds`"


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        (["--set", "metrics.port=70000"], "/metrics/port"),
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "operator.watchNamespaces={Team_A}"], "watchNamespaces"),
        (["--set", "operator.nameSpaces={a}"], "nameSpaces"),
        (["--set", "replicas=2"], "replicas"),
    ],
)
def test_schema_refuses_bad_values_naming_them(tools, values, complaint):
    result = helm(tools, "template", CHART, "--kube-version", "1.36.0", *values, check=False)
    assert result.returncode != 0, f"{values} was accepted"
    assert complaint in result.stderr, result.stderr


def test_rendered_objects_for_the_operator(tools):
    objects = [o for o in yaml.safe_load_all(render(tools)) if o]
    by_kind = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    deployment = by_kind[("Deployment", "cache-operator")]["spec"]
    assert deployment["replicas"] == 1 and deployment["strategy"] == {"type": "Recreate"}
    pod = deployment["template"]["spec"]
    assert pod["serviceAccountName"] == "cache-operator"
    container = pod["containers"][0]
    assert container["command"] == ["cacheoperator"]
    assert "--all-namespaces" in container["args"]
    assert "--peering=cache-operator" in container["args"]
    assert "--liveness=http://0.0.0.0:8080/healthz" in container["args"]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "healthz"}
    assert ("ClusterKopfPeering", "cache-operator") in by_kind
    assert ("ClusterRole", "cache-operator") in by_kind
    service = by_kind[("Service", "cache-operator")]["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {"metrics": 9160, "healthz": 8080}
    hook = by_kind[("Pod", "cache-operator-test-liveness")]
    assert hook["metadata"]["annotations"]["helm.sh/hook"] == "test"

    namespaced = [o for o in yaml.safe_load_all(render(tools, *VARIANTS["namespaced"])) if o]
    kinds = sorted((o["kind"], o["metadata"].get("namespace", "")) for o in namespaced)
    assert ("Role", "default") in kinds and ("Role", "kube-public") in kinds
    assert ("KopfPeering", "default") in kinds
    assert not any(k == "ClusterKopfPeering" for k, _ in kinds)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_rendered_chart_passes_a_server_side_dry_run(tools, cluster, chart, variant):
    """Every object the chart renders is valid for the API server (schemas, admission)."""
    manifests = render(tools, *VARIANTS[variant])
    result = kubectl(
        tools, cluster.kubeconfig, "apply", "--dry-run=server", "-f", "-", stdin=manifests
    )
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/cache-operator" in result.stdout


def test_install_creates_what_the_operator_needs(api, chart):
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    ns = product.NAMESPACE
    core.read_namespaced_service_account(product.SERVICE_ACCOUNT, ns)
    client.RbacAuthorizationV1Api(api).read_cluster_role_binding("cache-operator")
    client.CustomObjectsApi(api).get_cluster_custom_object(
        "kopf.dev", "v1", "clusterkopfpeerings", product.PEERING
    )
    crds = client.ApiextensionsV1Api(api).list_custom_resource_definition().items
    names = {c.metadata.name for c in crds}
    assert {"cacheclusters.cache.appliance.io", "clusterkopfpeerings.kopf.dev"} <= names
    deployment = apps.read_namespaced_deployment("cache-operator", ns)
    assert deployment.spec.replicas == 1


def test_install_notes_tell_the_next_step(chart):
    notes = chart.output.split("NOTES:", 1)[1]
    assert "watching every namespace" in notes
    assert "helm test cache-operator -n cache-system" in notes
    assert "kubectl apply -f examples/cachecluster.yaml" in notes
    assert ".status.endpoints" in notes


def test_operator_runs_as_a_pod_from_the_image_with_its_mounted_token(api, chart, operator):
    """The Deployment's pod runs on a node, from the image the chart names, as the chart's
    ServiceAccount with the token the kubelet mounted; it is Ready from its liveness port."""
    pod = operator.pod()
    assert pod.status.phase == "Running"
    assert pod.spec.node_name, "the operator's pod is not on a node"
    (container,) = pod.spec.containers
    assert container.image == chart.image
    (status,) = pod.status.container_statuses
    assert status.ready and status.image_id, status
    assert pod.spec.service_account_name == product.SERVICE_ACCOUNT
    mounts = {m.mount_path for m in container.volume_mounts or []}
    assert "/var/run/secrets/kubernetes.io/serviceaccount" in mounts
    # The process runs in the pod's cgroup on its node, with the in-cluster environment.
    env = process_env(operator.pid())
    assert env.get("KUBERNETES_SERVICE_HOST"), "in-cluster config comes from the pod's env"
    assert env.get("POD_ID") == pod.metadata.name


# Verbs and resources the operator must have (docs/operator.md), as `kubectl auth can-i`
# arguments, and some it must not: it never deletes pods, reads secrets or grants itself more.
ALLOWED = [
    ("watch", "cacheclusters.cache.appliance.io"),
    ("patch", "cacheclusters.cache.appliance.io", "--subresource=status"),
    ("update", "cacheclusters.cache.appliance.io", "--subresource=finalizers"),
    ("create", "statefulsets.apps"),
    ("delete", "statefulsets.apps"),
    ("patch", "services"),
    ("create", "configmaps"),
    ("create", "poddisruptionbudgets.policy"),
    ("watch", "pods"),
    # Warm restart: to release a replaced pod's scheduling gate with its previous node.
    ("patch", "pods"),
    ("get", "nodes"),
    ("create", "events"),
    ("patch", "events.events.k8s.io"),
    ("patch", "clusterkopfpeerings.kopf.dev"),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
]
DENIED = [
    ("delete", "pods"),
    ("create", "pods"),
    ("get", "secrets"),
    ("list", "secrets"),
    ("delete", "cacheclusters.cache.appliance.io"),
    # Only the status is written: kopf's event handlers keep no bookkeeping on the object.
    ("patch", "cacheclusters.cache.appliance.io"),
    ("create", "cacheclusters.cache.appliance.io"),
    ("update", "cacheclusters.cache.appliance.io"),
    ("delete", "services"),
    ("delete", "configmaps"),
    ("update", "statefulsets.apps"),
    ("create", "deployments.apps"),
    ("patch", "nodes"),
    ("list", "nodes"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("impersonate", "serviceaccounts"),
    ("create", "serviceaccounts/token"),
    ("delete", "namespaces"),
]


def test_service_account_may_do_what_the_operator_needs_and_no_more(
    tools, api, cluster, operator, tmp_path
):
    """Asked of the API server with a token of the operator's ServiceAccount
    (SelfSubjectAccessReview)."""
    kubeconfig = product.service_account_kubeconfig(
        api, cluster.kubeconfig, tmp_path / "operator.kubeconfig"
    )

    def can(verb: str, resource: str, *extra: str) -> bool:
        result = kubectl(tools, kubeconfig, "auth", "can-i", verb, resource, "-A", *extra)
        assert result.stdout.strip() in ("yes", "no"), result.stderr
        return result.stdout.strip() == "yes"

    missing = [" ".join(a) for a in ALLOWED if not can(*a)]
    excess = [" ".join(d) for d in DENIED if can(*d)]
    assert not missing, f"the chart's RBAC lacks: {missing}"
    assert not excess, f"the chart's RBAC allows more than needed: {excess}"
    whoami = kubectl(tools, kubeconfig, "auth", "whoami", "-o", "jsonpath={.status.userInfo}")
    assert "system:serviceaccount:cache-system:cache-operator" in whoami.stdout


def test_helm_test_finds_the_operator_live(tools, api, cluster, operator):
    """`helm test` runs the chart's hook pod, which asks the operator's liveness endpoint
    through its Service: a ClusterIP, through kube-proxy on the test pod's node. This
    cluster runs no DNS server, so the test URL names the Service's address instead of
    its DNS name (the chart's value tests.url, kept with --reuse-values otherwise)."""
    service = client.CoreV1Api(api).read_namespaced_service(product.RELEASE, product.NAMESPACE)
    port = next(p.port for p in service.spec.ports if p.name == "healthz")
    url = f"http://{service.spec.cluster_ip}:{port}/healthz"
    env_kubeconfig = {"kubeconfig": cluster.kubeconfig}
    helm(
        tools, "upgrade", product.RELEASE, CHART, "--namespace", product.NAMESPACE,
        "--reuse-values", "--set", f"tests.url={url}", "--wait", **env_kubeconfig,
    )  # fmt: skip
    result = helm(
        tools,
        "test",
        product.RELEASE,
        "--namespace",
        product.NAMESPACE,
        "--timeout=120s",
        kubeconfig=cluster.kubeconfig,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Phase:          Succeeded" in result.stdout, result.stdout
