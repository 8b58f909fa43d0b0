"""Generate the CustomResourceDefinitions in crds/ from the pydantic models.

    python -m cacheoperator.crdgen crds/      # what `make crds` runs

pydantic writes JSON Schema; the API server wants a *structural* OpenAPI schema: no `$ref`,
no `anyOf` except the int-or-string form, no `additionalProperties: false` next to
`properties`, no titles. `structural()` turns one into the other and refuses anything it
does not know, so a new kind of field fails here instead of in a cluster.

Besides the CacheCluster CRD this writes kopf's peering CRDs (kopf.dev), which the operator
needs for peering; kopf does not install them itself.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from cacheoperator import yamlfmt
from cacheoperator.models import (
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    CacheClusterSpec,
    CacheClusterStatus,
)
from cacheoperator.rules import ROOT_RULES, SPEC_RULES, Rule

HEADER = (
    "# Generated from the pydantic models by `python -m cacheoperator.crdgen crds/`; do not edit.\n"
)

# Keys that may pass through unchanged; anything else is a schema feature to handle first.
_PLAIN_KEYS = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "required",
    "x-kubernetes-int-or-string",
}
_KEY_ORDER = [
    "description",
    "type",
    "x-kubernetes-int-or-string",
    "anyOf",
    "enum",
    "format",
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "maxProperties",
    "items",
    "additionalProperties",
    "properties",
    "required",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-validations",
]


class SchemaError(ValueError):
    """The model produced JSON Schema that has no structural equivalent."""


def structural(node: dict[str, Any], defs: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Turn one pydantic JSON Schema node into a structural OpenAPI v3 schema node."""
    node = dict(node)
    if "$ref" in node:
        ref = node.pop("$ref")
        target = defs[ref.rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description and default win
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if len(branches) != 1:
            raise SchemaError(f"{where or 'root'}: a union other than Optional[X]")
        if node.get("default", "") is None:
            node.pop("default")
        # Optional[X]: not required and not nullable (the API server prunes nulls).
        return structural({**branches[0], **node}, defs, where)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title" or (key == "default" and value is None):
            continue
        if key == "additionalProperties":
            if value is False:
                continue  # the API server prunes unknown fields instead
            out[key] = structural(value, defs, f"{where}.*")
        elif key == "properties":
            out[key] = {
                name: structural(sub, defs, f"{where}.{name}") for name, sub in value.items()
            }
        elif key == "items":
            out[key] = structural(value, defs, f"{where}[]")
        elif key == "anyOf":
            out[key] = value  # only the int-or-string form reaches here
        elif key in _PLAIN_KEYS:
            out[key] = value
        else:
            raise SchemaError(f"{where or 'root'}: unsupported schema keyword {key!r}")
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    rank = {key: i for i, key in enumerate(_KEY_ORDER)}
    return dict(sorted(node.items(), key=lambda item: rank.get(item[0], len(rank))))


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return structural(raw, raw.pop("$defs", {}))


def validations(rules: tuple[Rule, ...], with_field_path: bool = True) -> list[dict[str, str]]:
    out = []
    for rule in rules:
        entry = {"rule": rule.cel, "message": rule.message, "reason": rule.reason}
        if with_field_path:
            entry["fieldPath"] = rule.field_path
        out.append(entry)
    return out


def _status_schema() -> dict[str, Any]:
    status = model_schema(CacheClusterStatus)
    conditions = status["properties"]["conditions"]
    # One condition per type, merged by type under server-side apply.
    conditions["x-kubernetes-list-type"] = "map"
    conditions["x-kubernetes-list-map-keys"] = ["type"]
    status["properties"]["endpoints"]["x-kubernetes-list-type"] = "atomic"
    return status


def cachecluster_crd() -> dict[str, Any]:
    # spec is required rather than defaulted: the API server checks a default against the
    # CEL rules as it stands, before the defaults of its own fields are filled in.
    spec = model_schema(CacheClusterSpec)
    spec["x-kubernetes-validations"] = validations(SPEC_RULES)
    schema = {
        "description": "A fleet of memcached-compatible cache appliances.",
        "type": "object",
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": _ordered(spec),
            "status": _status_schema(),
        },
        "required": ["spec"],
        # metadata.name is not in this schema, so these rules carry no fieldPath.
        "x-kubernetes-validations": validations(ROOT_RULES, with_field_path=False),
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": [
                        _column("Strategy", "string", ".spec.placement.strategy"),
                        _column("Ready", "integer", ".status.readyReplicas"),
                        _column("Replicas", "integer", ".spec.replicas"),
                        _column("Phase", "string", ".status.phase"),
                        _column(
                            "Pinned", "string", '.status.conditions[?(@.type=="Pinned")].status'
                        ),
                        _column("Age", "date", ".metadata.creationTimestamp"),
                    ],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def _column(name: str, kind: str, path: str) -> dict[str, str]:
    return {"name": name, "type": kind, "jsonPath": path}


def peering_crd(kind: str, scope: str) -> dict[str, Any]:
    """kopf's peering resource: operators write keep-alives under status, keyed by identity."""
    plural = kind.lower() + "s"
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "scope": scope,
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                # The keys are operator identities, unknown in advance.
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                },
                            },
                        }
                    },
                }
            ],
        },
    }


def generate() -> dict[str, str]:
    """File name -> file content, for every CRD this project ships."""
    docs = {
        f"{GROUP}_{PLURAL}.yaml": cachecluster_crd(),
        "kopf.dev_clusterkopfpeerings.yaml": peering_crd("ClusterKopfPeering", "Cluster"),
        "kopf.dev_kopfpeerings.yaml": peering_crd("KopfPeering", "Namespaced"),
    }
    return {name: HEADER + yamlfmt.dump(doc) for name, doc in docs.items()}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m cacheoperator.crdgen OUTPUT_DIR", file=sys.stderr)
        return 2
    out = Path(args[0])
    out.mkdir(parents=True, exist_ok=True)
    for name, text in generate().items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
