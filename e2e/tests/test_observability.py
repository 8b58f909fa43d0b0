"""The chart's monitoring, proven against a real Prometheus (upstream, built by make e2e-bins).

Three cacheserver pods (two StatefulSets, as a two-partition CacheCluster has, labelled the
way the operator labels its pods, running the project's image) run on the cluster's nodes.
Prometheus runs on this machine with the scrape jobs the Prometheus Operator would make of
the chart's rendered PodMonitor and ServiceMonitor: it discovers the appliance pods through
the API server (pod role, attach_metadata node, with a client certificate bound to a
read-only ClusterRole) and relabels them with node, zone, rack and partition; it finds the
chart's operator pod through its Service's Endpoints (endpoints role), while the operator
runs an example CacheCluster. The chart's alert rules are loaded with every `for:` cut to
a few seconds.

Traffic comes from pymemcache's HashClient in two phases: a working set that fits, then
new keys faster than the caches hold them. Then: every dashboard expression has data, every
alert rule evaluates, the overload alerts fire, and CacheApplianceDown fires when one
appliance hangs (SIGSTOP) and clears when it resumes.

E2E_DASHBOARD_PNG=path also draws the overview dashboard from the run's data to that file
(`make dashboard-picture` writes docs/images/cache-cluster-overview.png).
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from kubernetes import client

from cacheoperator.naming import LABEL_PARTITION, LABEL_STATEFULSET, common_labels
from e2e import monitoring
from e2e.appliance import is_ready, pid_of
from e2e.base import REPO_ROOT, ClusterError, binary, wait_for
from e2e.nodes import RACK_LABEL, ZONE_LABEL
from e2e.prometheus import (
    Prometheus,
    podmonitor_scrape_configs,
    scale_for_durations,
    servicemonitor_scrape_configs,
)

INTERVAL = "1s"  # scrape and rule evaluation
RATE_INTERVAL = "4s"  # Grafana's $__rate_interval: four scrape intervals
ALERT_FOR = "3s"  # every alert's `for:` in this run
# Each appliance sizes itself from a 64 MiB cgroup (-m auto): about 24 MiB of items once the
# interpreter (~28 MiB), 64 connections and 8 MiB of headroom are set aside. Small, so the
# overflow phase fills it within seconds.
MEMORY_LIMIT = "64Mi"
VALUE = b"v" * 8192
FIT_KEYS = 300  # 2.4 MB over three appliances: fits
PHASE_SECONDS = 10.0
PROMETHEUS_USER = "e2e:prometheus"
# Two partitions as a partition CacheCluster would have them: (partition, replicas).
PARTITIONS = ((0, 2), (1, 1))
CACHECLUSTER = "obs"
EXAMPLE = "cache"  # examples/cachecluster.yaml, which the operator runs meanwhile


@dataclass
class Run:
    """What the module's fixture set up, and which alerts fired under load."""

    prometheus: Prometheus
    namespace: str
    operator_namespace: str  # where the operator runs the example CacheCluster
    pods: list[client.V1Pod]
    nodes: dict[str, dict[str, str]]
    started: float
    fired: dict[str, list[dict]] = field(default_factory=dict)

    def variables(self, dashboard: str = "Cache cluster overview") -> dict[str, str]:
        """The dashboards' variables as a user would pick them for this run: both
        CacheClusters, the appliances scraped here and the operator's example, whose
        rollout and restores the operator's series describe (Grafana joins a multi-value
        selection with |)."""
        return {
            **monitoring.DEFAULT_BUILTINS,
            "__rate_interval": RATE_INTERVAL,
            "datasource": "prometheus",
            "job": "cache-operator" if dashboard == "Cache operator" else "cacheserver",
            "operator_job": "cache-operator",
            "namespace": f"({self.namespace}|{self.operator_namespace})",
            "cachecluster": f"({CACHECLUSTER}|{EXAMPLE})",
        }


class CacheLoad:
    """memcached traffic from a background thread. ``fit``: a working set that fits, gets
    that fill a key they miss, and a few updates: nearly all hits. ``overflow``: a new key
    with each get, gets over the last 20,000 keys, more than the caches hold: they evict and
    miss. Once a second, a malformed datagram to each UDP port (counted as a drop)."""

    def __init__(self, servers: list[tuple[str, int]]) -> None:
        from pymemcache.client.hash import HashClient

        self.client = HashClient(
            servers,
            connect_timeout=1,
            timeout=1,
            ignore_exc=True,
            default_noreply=False,
            retry_attempts=1,
            retry_timeout=1,
            dead_timeout=2,
        )
        self.udp_targets = servers
        self.phase = "fit"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cache-load", daemon=True)

    def __enter__(self) -> CacheLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()

    def _run(self) -> None:
        rng = random.Random(7)
        spilled = 0
        next_udp = 0.0
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            while not self._stop.is_set():
                if self.phase == "fit":
                    key = f"fit-{rng.randrange(FIT_KEYS)}"
                    if rng.random() < 0.02:
                        self.client.set(key, VALUE)
                    elif self.client.get(key) is None:
                        self.client.set(key, VALUE)  # read-through: a miss fills the key
                else:
                    spilled += 1
                    self.client.set(f"spill-{spilled}", VALUE)
                    # Three caches hold about 8,000 of these (keys below 1 were never set).
                    self.client.get(f"spill-{rng.randrange(spilled - 20000, spilled + 1)}")
                now = time.monotonic()
                if now >= next_udp:
                    next_udp = now + 1.0
                    for address in self.udp_targets:
                        with contextlib.suppress(OSError):
                            udp.sendto(b"bad", address)  # shorter than the 8-byte frame header


def appliance_statefulset(partition: int, replicas: int, port: int, image: str) -> dict:
    """A StatefulSet of one partition, labelled as the operator labels its pods, with the
    server configured through the same env the operator sets."""
    name = f"{CACHECLUSTER}-p{partition}"
    labels = common_labels(CACHECLUSTER) | {
        LABEL_STATEFULSET: name,
        LABEL_PARTITION: str(partition),
    }
    field_ref = lambda path: {"fieldRef": {"fieldPath": path}}  # noqa: E731
    container = {
        "name": "cacheserver",
        "image": image,
        "command": ["cacheserver"],
        "env": [
            {"name": "CACHESERVER_LISTEN", "valueFrom": field_ref("status.hostIP")},
            {"name": "CACHESERVER_PORT", "value": str(port)},
            {"name": "CACHESERVER_UDP_PORT", "value": str(port)},
            {"name": "CACHESERVER_METRICS_PORT", "value": str(port + 1)},
            {"name": "CACHESERVER_CONN_LIMIT", "value": "64"},
            {"name": "CACHESERVER_MEMORY_HEADROOM", "value": "8"},
            {"name": "CACHESERVER_CONTAINER_MEMORY_LIMIT",
             "valueFrom": {"resourceFieldRef": {"resource": "limits.memory"}}},
            {"name": "POD_NAME", "valueFrom": field_ref("metadata.name")},
            {"name": "NODE_NAME", "valueFrom": field_ref("spec.nodeName")},
            {"name": "HOST_IP", "valueFrom": field_ref("status.hostIP")},
            {"name": "CACHESERVER_PARTITION",
             "valueFrom": field_ref(f"metadata.labels['{LABEL_PARTITION}']")},
        ],
        "ports": [
            {"name": "tcp-0", "containerPort": port, "hostPort": port},
            {"name": "udp-0", "containerPort": port, "hostPort": port, "protocol": "UDP"},
            {"name": "metrics", "containerPort": port + 1, "hostPort": port + 1},
        ],
        "resources": {"limits": {"memory": MEMORY_LIMIT}},
        "readinessProbe": {"exec": {"command": ["cacheserver-probe"]}, "periodSeconds": 1},
    }  # fmt: skip
    return {
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "serviceName": f"{CACHECLUSTER}-headless",
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {LABEL_STATEFULSET: name}},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "hostNetwork": True,
                    "dnsPolicy": "ClusterFirstWithHostNet",
                    "terminationGracePeriodSeconds": 5,
                    "containers": [container],
                },
            },
        },
    }


def grant_prometheus(cluster, rbac: client.RbacAuthorizationV1Api) -> tuple[dict, str]:
    """A client certificate for Prometheus and a ClusterRole that only reads pods and nodes
    (attach_metadata watches nodes); returns the kubernetes_sd_configs connection part and
    the name of the role and its binding."""
    name = f"e2e-prometheus-{secrets.token_hex(3)}"
    rbac.create_cluster_role(
        {
            "metadata": {"name": name},
            "rules": [{"apiGroups": [""],
                       "resources": ["pods", "nodes", "services", "endpoints"],
                       "verbs": ["get", "list", "watch"]}],
        }
    )  # fmt: skip
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                          "name": PROMETHEUS_USER}],
        }
    )  # fmt: skip
    cert, key = cluster.pki.issue("client-e2e-prometheus", PROMETHEUS_USER)
    return {
        "api_server": cluster.server,
        "tls_config": {
            "ca_file": str(cluster.pki.ca_cert),
            "cert_file": str(cert),
            "key_file": str(key),
        },
    }, name


def kubectl(cluster, *args: str) -> None:
    argv = [str(binary("kubectl")), "--kubeconfig", str(cluster.kubeconfig), *args]
    subprocess.run(argv, check=True, timeout=60, stdout=subprocess.DEVNULL)


def wait(what: str, check, timeout: float = 60.0):
    try:
        return wait_for(what, check, timeout, interval=0.5)
    except ClusterError as e:
        pytest.fail(str(e))


# What the overload alerts compare, to say why one did not fire.
OVERLOAD = {
    "hit ratio": 'sum(rate(memcached_commands_total{command="get", status="hit"}[10m]))'
    ' / sum(rate(memcached_commands_total{command="get"}[10m]))',
    "evictions per set": "sum(rate(memcached_items_evicted_total[10m]))"
    ' / sum(rate(memcached_commands_total{command="set"}[10m]))',
}


def wait_firing(prometheus: Prometheus, name: str, timeout: float = 60.0) -> list[dict]:
    try:
        return wait_for(f"{name} to fire", lambda: prometheus.firing(name), timeout, interval=0.5)
    except ClusterError as e:
        now = {k: prometheus.query(v) for k, v in OVERLOAD.items()}
        pytest.fail(f"{e}\nalerts: {prometheus.alerts()}\nnow: {now}")


@pytest.fixture(scope="module")
def run(cluster, api, agent, chart, operator, tmp_path_factory) -> Iterator[Run]:
    workdir = tmp_path_factory.mktemp("observability")
    core, apps = client.CoreV1Api(api), client.AppsV1Api(api)
    rbac = client.RbacAuthorizationV1Api(api)
    suffix = secrets.token_hex(3)
    namespace, operator_ns = f"obs-{suffix}", f"obs-operator-{suffix}"
    for ns in (namespace, operator_ns):
        core.create_namespace({"metadata": {"name": ns}})
    started = time.time()
    prometheus = None
    role = None
    try:
        wait(
            "the default service account",
            lambda: core.read_namespaced_service_account("default", namespace),
        )
        port = random.randint(20000, 29000)
        for partition, replicas in PARTITIONS:
            apps.create_namespaced_stateful_set(
                namespace, appliance_statefulset(partition, replicas, port, chart.image)
            )
        sd, role = grant_prometheus(cluster, rbac)

        # The monitors as the chart renders them, at this run's pace.
        values = {
            "monitoring": {
                "podMonitor": {
                    "enabled": True,
                    "interval": INTERVAL,
                    "scrapeTimeout": "900ms",
                    "scrapeNamespaces": [namespace],
                },
                "serviceMonitor": {
                    "enabled": True,
                    "interval": INTERVAL,
                    "scrapeTimeout": "900ms",
                },
                "prometheusRule": {"enabled": True},
            }
        }
        objects = monitoring.helm_template(binary("helm"), values)
        (podmonitor,) = monitoring.of_kind(objects, "PodMonitor")
        (servicemonitor,) = monitoring.of_kind(objects, "ServiceMonitor")
        (rule,) = monitoring.of_kind(objects, "PrometheusRule")
        scrape = podmonitor_scrape_configs(podmonitor, sd)
        scrape += servicemonitor_scrape_configs(servicemonitor, sd)
        groups = scale_for_durations(rule["spec"]["groups"], ALERT_FOR)
        prometheus = Prometheus(workdir / "prometheus", scrape, groups, INTERVAL).start()

        def pods() -> list[client.V1Pod]:
            return core.list_namespaced_pod(namespace).items

        wait("three appliance pods Ready", lambda: len(p := pods()) == 3 and all(map(is_ready, p)))
        wait(
            "Prometheus to scrape three appliances and the operator",
            lambda: (
                len(prometheus.query('up{job="cacheserver"} == 1')) == 3
                and prometheus.query('up{job="cache-operator"} == 1')
            ),
        )
        # The operator's work while Prometheus watches: an example CacheCluster comes up
        # (a pass per pod that starts or turns Ready), and is scaled down in the overflow phase.
        example = REPO_ROOT / "examples" / "cachecluster.yaml"
        kubectl(cluster, "apply", "-n", operator_ns, "-f", str(example))
        nodes = {n.metadata.name: n.metadata.labels for n in core.list_node().items}
        state = Run(prometheus, namespace, operator_ns, pods(), nodes, started)
        servers = [(p.status.pod_ip, port) for p in state.pods]
        with CacheLoad(servers) as load:
            time.sleep(PHASE_SECONDS)
            load.phase = "overflow"
            overflow_started = time.time()
            kubectl(cluster, "patch", "-n", operator_ns, "cachecluster", EXAMPLE, "--type=merge",
                    "-p", '{"spec": {"replicas": 2}}')  # fmt: skip
            for name in ("CacheEvictionsHigh", "CacheHitRatioLow"):
                state.fired[name] = wait_firing(prometheus, name)
            time.sleep(max(0.0, PHASE_SECONDS - (time.time() - overflow_started)))
            load.phase = "fit"
            # The operator's account of its example: rollout progress from its first pass,
            # what each appliance restored once they have reported (honoured labels: the
            # CacheCluster's namespace, not the operator's).
            restored = (
                f'cacheoperator_appliance_restored_items{{job="cache-operator", '
                f'namespace="{operator_ns}", cachecluster="{EXAMPLE}"}}'
            )
            wait("the operator's series of its example", lambda: prometheus.query(restored), 120)
            yield state
    finally:
        if prometheus is not None:
            prometheus.stop()
        for ns in (namespace, operator_ns):
            with contextlib.suppress(client.ApiException):
                core.delete_namespace(ns)
        if role is not None:
            with contextlib.suppress(client.ApiException):
                rbac.delete_cluster_role_binding(role)
                rbac.delete_cluster_role(role)


def test_prometheus_discovers_each_appliance_with_its_place(run: Run):
    """Every appliance pod is a target, labelled with the node, zone, rack and partition it
    runs on and in, which are also what the pod itself reports (cacheappliance_pod_info)."""
    up = run.prometheus.query('up{job="cacheserver"}')
    assert len(up) == 3
    by_pod = {s["metric"]["pod"]: s["metric"] for s in up}
    info = {
        s["metric"]["pod"]: s["metric"]
        for s in run.prometheus.query('cacheappliance_pod_info{job="cacheserver"}')
    }
    for pod in run.pods:
        labels = by_pod[pod.metadata.name]
        node = pod.spec.node_name
        assert labels["namespace"] == run.namespace
        assert labels["cachecluster"] == CACHECLUSTER
        assert labels["node"] == node
        assert labels["zone"] == run.nodes[node][ZONE_LABEL]
        assert labels["rack"] == run.nodes[node][RACK_LABEL]
        assert labels["partition"] == pod.metadata.labels[LABEL_PARTITION]
        assert labels["endpoint"] == "metrics"
        assert info[pod.metadata.name]["node_name"] == node
        assert info[pod.metadata.name]["partition_number"] == labels["partition"]
        assert info[pod.metadata.name]["host_ip"] == pod.status.host_ip
    assert {labels["partition"] for labels in by_pod.values()} == {"0", "1"}


def test_every_dashboard_expression_returns_data(run: Run):
    """Each panel query and variable query, with the dashboards' variables set to this run,
    has at least one sample that is a number (not NaN) over the run."""
    end = time.time()
    empty = []
    for query in monitoring.all_dashboard_queries():
        expr = monitoring.substitute(query.expr, run.variables(query.dashboard))
        series = run.prometheus.query_range(expr, run.started, end, 1.0)
        values = [float(v) for s in series for _, v in s["values"]]
        if not any(not math.isnan(v) for v in values):
            empty.append(f"{query.where}: {expr}")
    assert not empty, "no data for:\n" + "\n".join(empty)


def test_the_variables_list_this_run(run: Run):
    prom = run.prometheus
    assert prom.api("label/job/values", **{"match[]": "memcached_up"}) == ["cacheserver"]
    namespaces = prom.api(
        "label/namespace/values", **{"match[]": 'memcached_up{job="cacheserver"}'}
    )
    assert namespaces == [run.namespace]
    clusters = prom.api("label/cachecluster/values", **{"match[]": "memcached_up"})
    assert clusters == [CACHECLUSTER]


def test_every_alert_rule_evaluates_and_the_overload_alerts_fired(run: Run):
    rules = run.prometheus.rules()
    alert_rules = {r["name"]: r for r in rules if r["type"] == "alerting"}
    assert set(alert_rules) == {a.name for a in monitoring.alerts()}
    for name, rule in alert_rules.items():
        assert rule["health"] == "ok", f"{name}: {rule.get('lastError')}"
        assert rule.get("lastEvaluation", "").startswith("20"), f"{name} never evaluated"
    # The overflow phase pushed out items and missed: both fired, on this CacheCluster.
    (hit_ratio,) = run.fired["CacheHitRatioLow"]
    assert hit_ratio["labels"]["cachecluster"] == CACHECLUSTER
    assert float(hit_ratio["value"]) < 0.8
    evicting = {a["labels"]["pod"] for a in run.fired["CacheEvictionsHigh"]}
    assert evicting <= {p.metadata.name for p in run.pods} and evicting
    # And nothing that should be quiet fired: every appliance answers, memory is far off.
    for quiet in (
        "CacheApplianceDown",
        "CacheMemoryNearLimit",
        "CacheOperatorDown",
        "CacheRolloutDeadlineExceeded",  # the run scales, which no deadline holds
    ):
        assert not run.prometheus.firing(quiet), quiet


def test_appliance_down_fires_when_an_appliance_hangs_and_clears_when_it_resumes(run: Run):
    victim = run.pods[-1]
    pid = pid_of(victim)
    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        (alert,) = wait(
            "CacheApplianceDown to fire",
            lambda: run.prometheus.firing("CacheApplianceDown"),
            timeout=30,
        )
        fired_after = time.monotonic() - stopped
    finally:
        os.kill(pid, signal.SIGCONT)
    assert alert["labels"]["pod"] == victim.metadata.name
    assert alert["labels"]["node"] == victim.spec.node_name
    assert alert["labels"]["severity"] == "critical"
    assert "is down" in alert["annotations"]["summary"]
    # Scrape timeout (0.9 s) + `for` (3 s) + evaluation steps: seconds, not minutes.
    assert fired_after < 20
    wait(
        "CacheApplianceDown to clear",
        lambda: not run.prometheus.firing("CacheApplianceDown"),
        timeout=30,
    )


def test_the_overview_dashboard_draws_from_the_run(run: Run, tmp_path):
    """The overview drawn with matplotlib from the run's query_range data; with
    E2E_DASHBOARD_PNG set, to that file (how docs/images/ gets its picture)."""
    from e2e.render_dashboard import render

    # The appliance hung by the test above serves again (the client library retries it).
    busy = (
        f'sum by (pod) (rate(memcached_commands_total{{job="cacheserver"}}[{RATE_INTERVAL}])) > 0'
    )
    wait("traffic on all three appliances", lambda: len(run.prometheus.query(busy)) == 3, 30)
    out = Path(os.environ.get("E2E_DASHBOARD_PNG") or tmp_path / "overview.png")
    drawn = render(
        run.prometheus,
        monitoring.CHART / "dashboards" / "cache-cluster-overview.json",
        run.variables(),
        run.started,
        time.time(),
        out,
        caption="Drawn by e2e/render_dashboard.py from the Prometheus of an e2e run "
        "(test_observability.py): a working set that fits, then new keys faster than the "
        "caches hold them, then one appliance hung (SIGSTOP) for a few seconds.",
    )
    assert out.stat().st_size > 50_000
    assert drawn >= 15  # panels with data
