"""The `cacheoperator` command line, handler registration and operator metrics."""

from __future__ import annotations

import kopf
import pytest
from prometheus_client import generate_latest

from cacheoperator import handlers
from cacheoperator.main import DEFAULT_METRICS_PORT, DEFAULT_PEERING, parse_args
from cacheoperator.metrics import OperatorMetrics


def test_defaults_watch_all_namespaces_with_peering():
    args = parse_args([])
    assert args.namespace == [] and not args.standalone
    assert args.peering == DEFAULT_PEERING
    assert args.metrics_port == DEFAULT_METRICS_PORT
    assert args.liveness is None


def test_namespaces_repeat_and_exclude_all_namespaces():
    assert parse_args(["-n", "a", "--namespace", "b"]).namespace == ["a", "b"]
    with pytest.raises(SystemExit):
        parse_args(["-n", "a", "-A"])


def test_standalone_excludes_a_peering_name():
    assert parse_args(["--standalone"]).standalone
    with pytest.raises(SystemExit):
        parse_args(["--standalone", "--peering", "x"])


def test_liveness_and_metrics_settings(monkeypatch):
    args = parse_args(["--liveness", "http://0.0.0.0:8080/healthz", "--metrics-port", "0"])
    assert args.liveness == "http://0.0.0.0:8080/healthz"
    assert args.metrics_port == 0
    assert parse_args([]).metrics_address == "0.0.0.0"
    assert parse_args(["--metrics-address", "127.0.0.1"]).metrics_address == "127.0.0.1"
    monkeypatch.setenv("CACHEOPERATOR_IMAGE", "registry.example/cache:9")
    assert parse_args([]).default_image == "registry.example/cache:9"


def test_a_bad_metrics_port_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--metrics-port", "70000"])
    assert "--metrics-port" in capsys.readouterr().err


def test_handlers_cover_the_cluster_and_its_children():
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    # Event handlers only: kopf's create/update/resume handlers would patch its bookkeeping
    # into every CacheCluster (all at once when many are created together).
    assert not registry._changing._handlers
    watched = {(h.selector.group, h.selector.any_name) for h in registry._watching._handlers}
    assert watched == {
        ("cache.appliance.io", "cacheclusters"),
        ("apps", "statefulsets"),
        ("", "pods"),
    }
    # No timers or daemons: they would put a kopf finalizer on every CacheCluster.
    assert not registry._spawning._handlers
    assert {h.id for h in registry._activities._handlers} == {"login", "configure"}


def _cluster(generation, observed=None, deleting=False):
    meta = {"name": "demo", "generation": generation}
    if deleting:
        meta["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    status = {} if observed is None else {"observedGeneration": observed}
    return {"metadata": meta, "status": status}


def test_a_cluster_gets_a_pass_when_found_new_or_changed_not_for_its_own_status():
    assert handlers.needs_pass(None, _cluster(3, 3))  # listed at start-up: resume
    assert handlers.needs_pass("ADDED", _cluster(1))
    assert handlers.needs_pass("MODIFIED", _cluster(4, 3))  # the spec was edited
    assert handlers.needs_pass("MODIFIED", _cluster(1))  # no status yet
    assert not handlers.needs_pass("MODIFIED", _cluster(4, 4))  # the operator's status write
    assert not handlers.needs_pass("MODIFIED", _cluster(5, 4, deleting=True))
    assert not handlers.needs_pass("DELETED", _cluster(4, 3))


def test_operator_metrics_count_reconciles_and_phases():
    metrics = OperatorMetrics()
    metrics.observe_reconcile("ok", 0.02)
    metrics.observe_reconcile("invalid", 0.01)
    metrics.set_phase("ns", "a", "Ready")
    metrics.set_phase("ns", "b", "Ready")
    metrics.set_phase("ns", "c", "Degraded")
    metrics.forget("ns", "b")
    text = generate_latest(metrics.registry).decode()
    assert 'cacheoperator_reconciles_total{result="ok"} 1.0' in text
    assert 'cacheoperator_reconciles_total{result="invalid"} 1.0' in text
    assert "cacheoperator_reconcile_duration_seconds_count 2.0" in text
    assert 'cacheoperator_clusters{phase="Ready"} 1.0' in text
    assert 'cacheoperator_clusters{phase="Degraded"} 1.0' in text
    assert 'cacheoperator_clusters{phase="Invalid"} 0.0' in text
    # No error yet, but the series is there: the first error is an increase an alert sees.
    assert 'cacheoperator_reconciles_total{result="error"} 0.0' in text


def test_operator_metrics_listen_where_told(monkeypatch):
    assert parse_args([]).metrics_address == "0.0.0.0"
    assert parse_args(["--metrics-address", "127.0.0.1"]).metrics_address == "127.0.0.1"
    monkeypatch.setenv("CACHEOPERATOR_METRICS_ADDRESS", "::1")
    assert parse_args([]).metrics_address == "::1"


def test_startup_settings_keep_kopf_out_of_the_status_and_filter_children_server_side():
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    (configure,) = [h for h in registry._activities._handlers if h.id == "configure"]
    settings = kopf.OperatorSettings()
    configure.fn(settings=settings)
    assert isinstance(settings.persistence.progress_storage, kopf.AnnotationsProgressStorage)
    assert isinstance(settings.persistence.diffbase_storage, kopf.AnnotationsDiffBaseStorage)
    selectors = {
        (sel.group, sel.any_name): value for sel, value in settings.watching.label_selectors.items()
    }
    expected = "app.kubernetes.io/managed-by=cacheoperator,cache.appliance.io/cluster"
    assert selectors == {("", "pods"): expected, ("apps", "statefulsets"): expected}
