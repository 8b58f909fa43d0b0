"""The chart's monitoring files without a cluster: promtool parses every alert and every
dashboard expression and fires every alert on synthetic series; the pinned helm renders the
monitors, rules and dashboards from those same files; the PodMonitor selects the pods the
operator builds. test_observability.py then runs them against a real Prometheus."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from cacheoperator.children import statefulsets
from cacheoperator.metrics import OperatorMetrics
from cacheoperator.models import parse_spec
from cacheoperator.naming import ClusterRef
from e2e import monitoring
from e2e.base import REPO_ROOT, ClusterError, binary
from testkit.net import free_port

OVERVIEW = monitoring.CHART / "dashboards" / "cache-cluster-overview.json"
OPERATOR = monitoring.CHART / "dashboards" / "cache-operator.json"

# What a dashboard's variables may hold; any value that keeps the PromQL valid will do.
SAMPLE_VARIABLES = {
    "datasource": "prometheus",
    "job": "cacheserver",
    "operator_job": "cache-operator",
    "namespace": "shop",
    "cachecluster": "cache|cache-part",
}


@pytest.fixture(scope="module")
def helm() -> Path:
    try:
        return binary("helm")
    except ClusterError as e:
        pytest.skip(str(e))


def test_the_alert_rule_files_pass_promtool_check():
    assert monitoring.RULE_FILES, "no rule files in charts/cache-operator/rules"
    output = monitoring.check_rule_files(*monitoring.RULE_FILES)
    assert "SUCCESS: 9 rules found" in output


def test_every_alert_fires_in_promtool_unit_tests():
    monitoring.run_alert_unit_tests()
    tests = yaml.safe_load(monitoring.ALERT_TESTS.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case.get("exp_alerts")
    }
    assert fired == {a.name for a in monitoring.alerts()}, "an alert has no test that fires it"


def test_every_alert_says_what_and_how_bad():
    for path in monitoring.RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
                assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_every_dashboard_expression_parses():
    queries = monitoring.all_dashboard_queries()
    assert len(queries) > 40, [q.where for q in queries]
    variables = {**monitoring.DEFAULT_BUILTINS, **SAMPLE_VARIABLES}
    exprs = {q.where: monitoring.substitute(q.expr, variables) for q in queries}
    assert "SUCCESS" in monitoring.check_expressions(exprs)


def test_promtool_refuses_a_broken_expression():
    """The check above can fail: one bad expression among good ones is named."""
    with pytest.raises(monitoring.PromtoolError, match=r"broken / panel / B.*parse error"):
        monitoring.check_expressions(
            {"good / panel / A": "sum(rate(up[5m]))", "broken / panel / B": "sum by (a (up)"}
        )


@pytest.mark.parametrize("path", monitoring.DASHBOARDS, ids=lambda p: p.stem)
def test_dashboards_use_only_their_own_variables_and_data_source(path: Path):
    board = monitoring.load_dashboard(path)
    names = monitoring.dashboard_variables(path)
    own = {**monitoring.DEFAULT_BUILTINS, **{n: "x" for n in names}}
    for query in monitoring.dashboard_queries(path):
        monitoring.substitute(query.expr, own)  # KeyError names an undefined variable
    panels = [p for p in board["panels"] if p["type"] != "row"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            # The dashboard's job; the operator's series in a dashboard of appliances
            # come from the operator's job.
            operator = "operator_job" in names and "cacheoperator_" in target["expr"]
            job = "operator_job" if operator else "job"
            assert f'job=~"${job}"' in target["expr"], (panel["title"], target["expr"])
    assert board["uid"] == path.stem


def test_the_overview_has_the_panels_operators_look_for():
    titles = {p["title"] for p in monitoring.load_dashboard(OVERVIEW)["panels"]}
    for wanted in (
        "Operations by command",
        "Hit ratio",
        "Memory: stored, capacity, working set, limit",
        "Evictions by cause",
        "Shrinker",
        "Connections",
        "UDP drops",
        "Request latency",
        "Appliances",
        "Hit ratio through rollouts",
        "Restored at start",
    ):
        assert wanted in titles
    table = next(
        p for p in monitoring.load_dashboard(OVERVIEW)["panels"] if p["title"] == "Appliances"
    )
    for target in table["targets"]:
        assert "by (namespace, cachecluster, pod, node, zone, rack, partition)" in target["expr"]
    operator_titles = {p["title"] for p in monitoring.load_dashboard(OPERATOR)["panels"]}
    assert {
        "Reconciles by result",
        "Errors",
        "Reconcile latency",
        "CacheClusters by phase",
        "Rollout progress",
    } <= operator_titles
    # Hit ratio and rollout progress in one panel: the appliances' series and the
    # operator's, for the same CacheClusters.
    (through,) = [
        p
        for p in monitoring.load_dashboard(OVERVIEW)["panels"]
        if p["title"] == "Hit ratio through rollouts"
    ]
    exprs = [t["expr"] for t in through["targets"]]
    assert any('status="hit"' in e for e in exprs)
    assert any("cacheoperator_rollout_progress" in e for e in exprs)


# ---- the metrics they read exist --------------------------------------------------------

# A status as a pass writes it, reduced to what the operator's metrics read.
PASSED_STATUS = {
    "conditions": [{"type": "Progressing", "status": "False", "reason": "Complete"}],
    "rollout": {"replicas": 3, "updatedReplicas": 3, "deadlineSeconds": 600},
    "appliances": [{"pod": "cache-0", "warmRestart": "restored", "restoredItems": 1000}],
}
_METRIC = re.compile(r"\b((?:memcached|cacheappliance|cacheoperator)_\w+)")
# With -t N the supervisor gathers each worker's `stats`, which has no latency histogram.
NOT_WITH_WORKERS = {"cacheappliance_request_duration_seconds_bucket"}


def used_metric_names() -> set[str]:
    exprs = [q.expr for q in monitoring.all_dashboard_queries()]
    exprs += [a.expr for a in monitoring.alerts()]
    return {m for e in exprs for m in _METRIC.findall(e)}


def exposed_names(text: str) -> set[str]:
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def scrape_cacheserver(*args: str) -> str:
    """The /metrics of a real cacheserver started with ``args``, on loopback."""
    # The virtual environment's console script, beside the Python running the tests.
    server = str(Path(sys.executable).parent / "cacheserver")
    port, metrics = free_port(), free_port()
    argv = [server, "-l", "127.0.0.1", "-p", str(port), "--metrics-port", str(metrics), *args]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=2) as r:
                    return r.read().decode()
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_every_metric_the_dashboards_and_alerts_read_is_exported():
    """Names in the dashboards and rules that no server or operator exports would be panels
    and alerts that never show anything: check them against a real cacheserver, alone and
    with two workers, and the operator's registry."""
    from prometheus_client import generate_latest

    used = used_metric_names()
    assert len(used) > 20, used
    # The operator's registry after a pass of one CacheCluster (its per-cluster series
    # exist from then on).
    registry = OperatorMetrics()
    registry.set_cluster("shop", "cache", PASSED_STATUS)
    operator = exposed_names(generate_latest(registry.registry).decode())
    single = exposed_names(scrape_cacheserver())
    workers = exposed_names(scrape_cacheserver("-t", "2"))
    for name in sorted(used):
        if name.startswith("cacheoperator_"):
            assert name in operator, name
            continue
        assert name in single, f"{name}: not exported by cacheserver"
        if name not in NOT_WITH_WORKERS:
            assert name in workers, f"{name}: not exported by cacheserver -t 2"


# ---- the chart, rendered by the pinned helm ---------------------------------------------


def test_by_default_only_the_dashboards_are_rendered(helm):
    objects = helm_monitoring(helm, {})
    assert {o["kind"] for o in objects} == {"ConfigMap"}
    by_file = {}
    for cm in objects:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        ((name, text),) = cm["data"].items()
        by_file[name] = text
    assert sorted(by_file) == sorted(p.name for p in monitoring.DASHBOARDS)
    for path in monitoring.DASHBOARDS:
        assert by_file[path.name] == path.read_text().rstrip("\n"), path.name


def test_dashboards_can_be_turned_off_and_sent_elsewhere(helm):
    assert helm_monitoring(helm, {"monitoring": {"dashboards": {"enabled": False}}}) == []
    values = {
        "monitoring": {
            "dashboards": {"namespace": "grafana", "annotations": {"grafana_folder": "Cache"}}
        }
    }
    for cm in helm_monitoring(helm, values):
        assert cm["metadata"]["namespace"] == "grafana"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Cache"}


def test_the_prometheusrule_holds_the_rule_files_and_passes_promtool(helm, tmp_path):
    objects = helm_monitoring(helm, monitoring.MONITORS_ON)
    (rule,) = monitoring.of_kind(objects, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    expected = [g for p in monitoring.RULE_FILES for g in yaml.safe_load(p.read_text())["groups"]]
    assert rule["spec"]["groups"] == expected
    # Prometheus' own templates ({{ $labels.pod }}) went through helm untouched.
    assert "{{ $labels.pod }}" in yaml.safe_dump(rule["spec"])
    extracted = tmp_path / "extracted.rules.yaml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    assert "SUCCESS: 9 rules found" in monitoring.check_rule_files(extracted)


def test_the_podmonitor_selects_the_pods_the_operator_builds(helm):
    objects = helm_monitoring(helm, monitoring.MONITORS_ON)
    (monitor,) = monitoring.of_kind(objects, "PodMonitor")
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"any": True}
    assert spec["attachMetadata"] == {"node": True}
    (endpoint,) = spec["podMetricsEndpoints"]
    example = yaml.safe_load((REPO_ROOT / "examples" / "cachecluster-partition.yaml").read_text())
    ref = ClusterRef(example["metadata"]["name"], "shop", "uid-1")
    for sts in statefulsets(ref, parse_spec(ref.name, example["spec"]), "img"):
        template = sts["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"] for p in template["spec"]["containers"][0]["ports"]}
        assert endpoint["port"] in ports
        # Every pod label a relabeling reads exists on the pod (Prometheus sanitises names).
        meta = {"__meta_kubernetes_pod_label_" + re.sub(r"\W", "_", k) for k in labels}
        for relabel in endpoint["relabelings"]:
            for source in relabel.get("sourceLabels", []):
                if source.startswith("__meta_kubernetes_pod_label_"):
                    assert source in meta, source
    targets = {r["targetLabel"] for r in endpoint["relabelings"]}
    assert {"job", "cachecluster", "node", "zone", "rack", "partition"} <= targets


def test_the_podmonitor_can_watch_chosen_namespaces_without_node_metadata(helm):
    values = {
        "monitoring": {
            "podMonitor": {
                "enabled": True,
                "scrapeNamespaces": ["shop", "cart"],
                "attachNodeMetadata": False,
                "labels": {"release": "kube-prometheus-stack"},
            }
        }
    }
    (monitor,) = monitoring.of_kind(helm_monitoring(helm, values), "PodMonitor")
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["shop", "cart"]}
    assert "attachMetadata" not in monitor["spec"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    relabeled = {r["targetLabel"] for r in monitor["spec"]["podMetricsEndpoints"][0]["relabelings"]}
    assert "zone" not in relabeled and "node" in relabeled


def test_the_servicemonitor_selects_the_operators_metrics_service(helm):
    objects = monitoring.helm_template(helm, monitoring.MONITORS_ON)
    (monitor,) = monitoring.of_kind(objects, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert {"targetLabel": "job", "replacement": "cache-operator"} in endpoint["relabelings"]
    # Per-CacheCluster series keep the cluster's namespace, not the operator pod's.
    assert endpoint["honorLabels"] is True
    services = [
        s
        for s in monitoring.of_kind(objects, "Service")
        if any(p.get("name") == endpoint["port"] for p in s["spec"].get("ports", []))
    ]
    if not services:
        pytest.skip("the chart has no operator metrics Service yet (its core is built apart)")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert any(selector.items() <= s["metadata"].get("labels", {}).items() for s in services)


def helm_monitoring(helm: Path, values: dict) -> list[dict]:
    """The objects the monitoring templates render (the chart core's are left out)."""
    kinds = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}
    return [
        o
        for o in monitoring.helm_template(helm, values)
        if o["kind"] in kinds
        or (o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"].get("labels", {}))
    ]
