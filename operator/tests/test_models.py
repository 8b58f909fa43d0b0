"""The CacheCluster API: defaults, and invalid specs rejected with the field named."""

from __future__ import annotations

import pytest

from cacheoperator.models import (
    DEFAULT_MAX_PER_ZONE,
    DEFAULT_RACK_KEY,
    DEFAULT_ZONE_KEY,
    CacheClusterManifest,
    InvalidSpec,
    derived_metrics_port,
    parse_spec,
)
from operator_testkit import EXAMPLES, load_example


def test_an_empty_spec_gets_the_documented_defaults():
    spec = parse_spec("demo", {})
    assert spec.replicas == 3
    assert spec.port == 11211
    assert (spec.udp.enabled, spec.udp_port) == (False, 11211)  # the TCP port, as memcached
    assert (spec.resources.cpu, spec.resources.memory) == (1, "1Gi")
    assert spec.memory.mode == "auto"
    assert spec.pinning is True
    assert spec.host_network is True
    assert spec.placement.strategy == "spread"
    assert spec.placement.effective_spread_level == "host"
    assert spec.placement.effective_max_per_zone == DEFAULT_MAX_PER_ZONE == 7
    assert spec.placement.zone_key == DEFAULT_ZONE_KEY == "topology.kubernetes.io/zone"
    assert spec.placement.rack_key == DEFAULT_RACK_KEY
    assert (spec.monitoring.enabled, spec.metrics_port) == (True, 21211)  # port + 10000
    assert spec.workers == 1


def test_fields_are_camel_case_in_yaml_and_round_trip():
    raw = {
        "hostNetwork": False,
        "pinning": False,
        "resources": {"cpu": "500m", "memory": "256Mi"},
        "placement": {"strategy": "spread", "spreadLevel": "rack", "maxPerZone": 2},
        "extraArgs": ["-c", "1024"],
        "imagePullPolicy": "IfNotPresent",
    }
    spec = parse_spec("demo", raw)
    assert spec.host_network is False
    assert spec.placement.spread_level == "rack"
    dumped = spec.model_dump(by_alias=True, exclude_none=True)
    assert dumped["placement"]["maxPerZone"] == 2
    assert parse_spec("demo", dumped) == spec


def test_tcp_and_udp_may_share_a_port_as_in_memcached():
    spec = parse_spec("demo", {"port": 11211, "udp": {"enabled": True, "port": 11211}})
    assert spec.port == spec.udp.port == 11211
    # TCP and UDP are separate port spaces: the metrics port may be a UDP worker's, too.
    spec = parse_spec("demo", {"port": 11300, "udp": {"enabled": True, "port": 21300}})
    assert spec.metrics_port == spec.udp_port == 21300


def test_unset_udp_and_metrics_ports_follow_the_tcp_port():
    spec = parse_spec("demo", {"port": 11311, "udp": {"enabled": True}})
    assert (spec.udp_port, spec.metrics_port) == (11311, 21311)
    spec = parse_spec("demo", {"port": 60000, "monitoring": {"enabled": True}})
    assert spec.metrics_port == 50000  # 70000 is no port: 10000 below instead
    spec = parse_spec("demo", {"port": 11211, "monitoring": {"port": 9150}})
    assert spec.metrics_port == 9150  # set by hand, as clusters made before the rule have it


@pytest.mark.parametrize("workers", [1, 2, 64])
def test_the_derived_metrics_port_never_meets_the_clusters_own_ports(workers):
    for port in range(1024, 65536 - workers + 1):
        metrics = derived_metrics_port(port)
        assert 1024 <= metrics <= 65535
        assert not port <= metrics < port + workers


def test_clusters_that_differ_only_in_port_share_no_host_port():
    from cacheoperator.pods import container

    def host_ports(port):
        spec = parse_spec("demo", {"port": port, "udp": {"enabled": True}, "workers": 1})
        return {
            (p["hostPort"], p["protocol"])
            for p in container(spec, "img", None, "cache", "demo")["ports"]
        }

    for a, b in [(11211, 11212), (11211, 11311), (11211, 12211), (20000, 20001)]:
        assert not host_ports(a) & host_ports(b), (a, b)


@pytest.mark.parametrize(
    "name, spec, field, fragment",
    [
        ("demo", {"replicas": -1}, "spec.replicas", "greater than or equal to 0"),
        ("demo", {"port": 80}, "spec.port", "greater than or equal to 1024"),
        ("demo", {"udp": {"enabled": True, "port": 70000}}, "spec.udp.port", "65535"),
        ("demo", {"placement": {"strategy": "ring"}}, "spec.placement.strategy", "'cluster'"),
        (
            "demo",
            {"placement": {"strategy": "partition", "partitions": 8}},
            "spec.placement.partitions",
            "less than or equal to 7",
        ),
        ("demo", {"resources": {"cpu": 0.5}}, "spec.resources.cpu", "'500m'"),
        ("demo", {"resources": {"memory": "lots"}}, "spec.resources.memory", "not a quantity"),
        ("demo", {"memory": {"mode": "max"}}, "spec.memory.mode", "'auto' or 'fixed'"),
        ("demo", {"replica": 3}, "spec.replica", "Extra inputs are not permitted"),
        ("demo", {"workers": 0}, "spec.workers", "greater than or equal to 1"),
        (
            "demo",
            {"placement": {"zoneKey": "not a label"}},
            "spec.placement.zoneKey",
            "should match pattern",
        ),
        ("demo", {"extraArgs": ["x" * 300]}, "spec.extraArgs[0]", "at most 256"),
        ("demo", {"tolerations": [{"effect": "Sometimes"}]}, "spec.tolerations[0].effect", ""),
        # cross-field rules (the CEL twins are checked in test_rules.py)
        (
            "demo",
            {"placement": {"strategy": "spread", "partitions": 2}},
            "spec.placement.partitions",
            "only allowed when placement.strategy is partition",
        ),
        (
            "demo",
            {"memory": {"mode": "fixed"}},
            "spec.memory.size",
            "required when memory.mode is fixed",
        ),
        (
            "demo",
            {"resources": {"cpu": "1500m"}},
            "spec.resources.cpu",
            "whole number of cores",
        ),
        ("demo", {"monitoring": {"port": 11211}}, "spec.monitoring.port", "must differ"),
        ("Cache_1", {}, "metadata.name", "DNS label"),
    ],
)
def test_an_invalid_spec_is_rejected_with_the_field_named(name, spec, field, fragment):
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(name, spec)
    problems = caught.value.problems
    assert any(p.startswith(f"{field}: ") and fragment in p for p in problems), problems
    # The exception's own text (what the operator logs and reports) names the field too.
    assert field in str(caught.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(InvalidSpec) as caught:
        parse_spec("demo", {"port": 80, "workers": 0, "placement": {"strategy": "ring"}})
    fields = sorted(p.split(":")[0] for p in caught.value.problems)
    assert fields == ["spec.placement.strategy", "spec.port", "spec.workers"]


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_is_a_valid_cachecluster(path):
    manifest = CacheClusterManifest.model_validate(load_example(path.name))
    assert manifest.kind == "CacheCluster"


def test_the_examples_cover_every_strategy():
    strategies = {
        CacheClusterManifest.model_validate(load_example(p.name)).spec.placement.strategy
        for p in EXAMPLES.glob("*.yaml")
    }
    assert strategies == {"cluster", "spread", "partition"}
