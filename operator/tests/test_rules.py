"""Every cross-field rule exists twice, as Python (pydantic) and as CEL (the CRD), and the
two halves name the same field. (That the CEL half also *rejects* each example is checked
against the API server's own validation code: see docs/operator.md.)"""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from cacheoperator.crdgen import cachecluster_crd
from cacheoperator.models import CacheClusterManifest, InvalidSpec, parse_spec, rule_example
from cacheoperator.rules import ALL_RULES, ROOT_RULES, SPEC_RULES, min_memory_mib
from operator_testkit import CRDS, walk_schema


def _schema(crd):
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _shipped_crd():
    return yaml.safe_load((CRDS / "cache.appliance.io_cacheclusters.yaml").read_text())


def test_rule_ids_are_unique():
    ids = [rule.id for rule in ALL_RULES]
    assert len(ids) == len(set(ids))


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda r: r.id)
def test_each_rule_rejects_its_example_naming_its_field(rule):
    with pytest.raises(ValidationError):
        CacheClusterManifest.model_validate(rule_example(rule))
    with pytest.raises(InvalidSpec) as caught:
        parse_spec(rule.example_name, rule.example_spec)
    # The example breaks this rule and nothing else, so the message is about this rule.
    assert caught.value.problems == [f"{rule.full_field}: {rule.message}"]
    assert rule.field in rule.message  # the message names the field on its own, too


@pytest.mark.parametrize("rule", SPEC_RULES, ids=lambda r: r.id)
def test_each_spec_rule_is_a_cel_validation_on_spec(rule):
    validations = _schema(_shipped_crd())["properties"]["spec"]["x-kubernetes-validations"]
    matching = [v for v in validations if v["rule"] == rule.cel]
    assert matching == [
        {
            "rule": rule.cel,
            "message": rule.message,
            "reason": rule.reason,
            "fieldPath": "." + rule.field,
        }
    ]


@pytest.mark.parametrize("rule", ROOT_RULES, ids=lambda r: r.id)
def test_each_root_rule_is_a_cel_validation_on_the_object(rule):
    validations = _schema(_shipped_crd())["x-kubernetes-validations"]
    assert {"rule": rule.cel, "message": rule.message, "reason": rule.reason} in validations


def test_the_crd_has_no_cel_rule_without_a_python_twin():
    schema = _schema(cachecluster_crd())
    in_crd = [v["rule"] for v in schema["properties"]["spec"]["x-kubernetes-validations"]]
    in_crd += [v["rule"] for v in schema["x-kubernetes-validations"]]
    assert sorted(in_crd) == sorted(rule.cel for rule in ALL_RULES)


@pytest.mark.parametrize("rule", SPEC_RULES, ids=lambda r: r.id)
def test_each_field_path_exists_in_the_schema(rule):
    # The API server refuses a CRD whose fieldPath points nowhere.
    paths = {p for p, _ in walk_schema(_schema(cachecluster_crd())["properties"]["spec"])}
    assert "." + rule.field in paths


def test_cel_cost_stays_bounded():
    # The API server estimates each rule's cost from the largest value it could see; an
    # unbounded string or list under `spec` makes that estimate unbounded, and the CRD is
    # refused. So every string and list and map in spec has a maximum size.
    spec = _schema(cachecluster_crd())["properties"]["spec"]
    for path, node in walk_schema(spec):
        if node.get("type") == "string" and "enum" not in node:
            assert "maxLength" in node, path
        if node.get("type") == "array":
            assert "maxItems" in node, path
        if node.get("type") == "object" and "additionalProperties" in node:
            assert "maxProperties" in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert "maxLength" in node, path


@pytest.mark.parametrize("workers", [1, 3])
def test_the_memory_floor_is_enough_for_a_real_server(workers):
    """The least resources.memory the CRD lets through starts a real server (-m auto, the
    operator's flags) with room for items; below the one-worker floor's 48Mi example, the
    server itself refuses to start."""
    from servers import start_cacheserver, stats

    floor = min_memory_mib(workers) * 1024 * 1024
    env = {"CACHESERVER_CONTAINER_MEMORY_LIMIT": str(floor)}
    server = start_cacheserver("-t", str(workers), udp=False, env=env)
    try:
        settings = stats(server, "settings")
    finally:
        server.stop()
    assert int(settings["memory_limit"]) == floor
    assert int(settings["memory_capacity"]) >= 1024 * 1024


def test_below_the_floor_the_server_would_not_start():
    import subprocess
    import sys

    rule = next(r for r in SPEC_RULES if r.id == "memory-limit-fits-the-server")
    below = rule.example_spec["resources"]["memory"]
    assert below.endswith("Mi")
    proc = subprocess.run(
        [sys.executable, "-m", "cacheserver", "-l", "127.0.0.1", "-p", "0"],
        env={"CACHESERVER_CONTAINER_MEMORY_LIMIT": str(int(below[:-2]) * 1024 * 1024)},
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert b"cannot size memory" in proc.stderr
