"""Invalid CacheClusters never reach the operator: the API server refuses them with the
CRD's CEL rules (installed by the chart), naming the field, with the operator's message."""

from __future__ import annotations

import json
import subprocess

import pytest
from kubernetes.client.exceptions import ApiException

from cacheoperator.models import rule_example
from cacheoperator.rules import ALL_RULES
from e2e.appliance import GROUP, PLURAL, VERSION, CacheClusters


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.id)
def test_api_server_refuses_each_rule_breaker_with_its_message(api, chart, namespace, rule):
    caches = CacheClusters(api, namespace)
    with pytest.raises(ApiException) as refused:
        caches.custom.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, rule_example(rule), dry_run="All"
        )
    assert refused.value.status == 422
    causes = json.loads(refused.value.body)["details"]["causes"]
    # A rule on the whole object has no fieldPath (metadata is not in the CRD's schema), so
    # the API server reports its field as "<nil>"; its message starts with the field's name.
    field = rule.full_field if rule.scope == "spec" else "<nil>"
    assert any(c.get("field") == field and rule.message in c.get("message", "") for c in causes), (
        causes
    )
    assert rule.full_field in " ".join(f"{c.get('field')}: {c.get('message')}" for c in causes)


RULES = {r.id: r for r in ALL_RULES}


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (
            {"placement": {"strategy": "spread", "partitions": 3}},
            "spec.placement.partitions: Forbidden: "
            + RULES["partitions-need-partition-strategy"].message,
        ),
        (
            {"resources": {"cpu": "500m"}},
            "spec.resources.cpu: Invalid value: " + RULES["pinning-needs-whole-cores"].message,
        ),
        (
            {"memory": {"mode": "fixed"}},
            "spec.memory.size: Required value: " + RULES["fixed-memory-needs-size"].message,
        ),
        # The schema's own checks, generated from the models' types and ranges.
        ({"replicas": -1}, "spec.replicas: Invalid value: -1: spec.replicas in body should be"),
        ({"placement": {"strategy": "pack"}}, 'spec.placement.strategy: Unsupported value: "pack"'),
    ],
    ids=["cel-forbidden", "cel-invalid", "cel-required", "range", "enum"],
)
def test_kubectl_apply_shows_the_user_why(tools, cluster, chart, namespace, spec, expected):
    manifest = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "CacheCluster",
        "metadata": {"name": "bad", "namespace": namespace},
        "spec": spec,
    }
    result = subprocess.run(
        [str(tools / "kubectl"), "--kubeconfig", str(cluster.kubeconfig), "apply", "-f", "-"],
        input=json.dumps(manifest),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, result.stdout
    assert 'The CacheCluster "bad" is invalid' in result.stderr, result.stderr
    assert expected in result.stderr, result.stderr
