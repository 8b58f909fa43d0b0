"""The CRD in crds/ is what the models generate, and a structural schema."""

from __future__ import annotations

import pytest
import yaml

from cacheoperator import crdgen
from cacheoperator.crdgen import SchemaError, structural
from operator_testkit import CRDS, walk_schema

QUANTITY_FIELDS = {".resources.cpu", ".resources.memory", ".memory.size", ".memory.headroom"}


def _schema():
    return crdgen.cachecluster_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crds_directory_matches_the_models():
    generated = crdgen.generate()
    shipped = {p.name: p.read_text() for p in CRDS.glob("*.yaml")}
    stale = sorted(name for name in generated if shipped.get(name) != generated[name])
    assert not stale, f"crds/ is stale for {stale}: run `make crds` and commit the result"
    assert sorted(shipped) == sorted(generated), "crds/ holds files the generator does not write"


def test_the_writer_writes_what_generate_returns(tmp_path):
    assert crdgen.main([str(tmp_path)]) == 0
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == crdgen.generate()


def test_the_schema_is_structural():
    for path, node in walk_schema(_schema()):
        assert "$ref" not in node and "title" not in node and "$defs" not in node, path
        assert node.get("additionalProperties") is not False, path
        assert not ("properties" in node and "additionalProperties" in node), path
        if "anyOf" in node:
            # The one non-structural form the API server accepts: int-or-string.
            assert node.get("x-kubernetes-int-or-string") is True, path
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            assert "type" not in node, path
        else:
            assert "type" in node or path == "", path
        assert "x-kubernetes-preserve-unknown-fields" not in node, path
        assert node.get("nullable") is not True, path


def test_quantities_are_int_or_string():
    spec = _schema()["properties"]["spec"]
    found = {p for p, n in walk_schema(spec) if n.get("x-kubernetes-int-or-string")}
    assert found == QUANTITY_FIELDS


def test_subresources_columns_and_names():
    version = crdgen.cachecluster_crd()["spec"]["versions"][0]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert {"Strategy", "Ready", "Replicas", "Pinned", "Age"} <= set(columns)
    names = crdgen.cachecluster_crd()["spec"]["names"]
    assert names["shortNames"] == ["cc"]
    assert crdgen.cachecluster_crd()["spec"]["scope"] == "Namespaced"


def test_spec_is_required_and_its_objects_default_to_empty():
    schema = _schema()
    assert schema["required"] == ["spec"]
    spec = schema["properties"]["spec"]
    for name in ("udp", "resources", "memory", "placement", "monitoring"):
        assert spec["properties"][name]["default"] == {}, name
    # Fields that only mean something for one strategy have no default at all, or the
    # "only with strategy X" rules would trip on every other strategy.
    placement = spec["properties"]["placement"]["properties"]
    for name in ("partitions", "spreadLevel", "maxPerZone"):
        assert "default" not in placement[name], name


def test_conditions_merge_by_type():
    conditions = _schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    assert "type" in conditions["items"]["required"]


def test_peering_crds_keep_only_status_open():
    for name in ("kopf.dev_kopfpeerings.yaml", "kopf.dev_clusterkopfpeerings.yaml"):
        crd = yaml.safe_load((CRDS / name).read_text())
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert schema["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
        assert "x-kubernetes-preserve-unknown-fields" not in schema
        # kopf writes keep-alives through the main resource, so no status subresource.
        assert "subresources" not in crd["spec"]["versions"][0]


def test_unions_other_than_optional_are_refused():
    with pytest.raises(SchemaError, match="union"):
        structural({"anyOf": [{"type": "integer"}, {"type": "boolean"}]}, {})


def test_unknown_schema_keywords_are_refused():
    with pytest.raises(SchemaError, match="oneOf"):
        structural({"oneOf": [{"type": "integer"}]}, {})
