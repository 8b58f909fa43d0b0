"""One appliance at a time: which StatefulSets may take a new pod template in this pass.

Within one StatefulSet the controller already replaces one pod at a time and waits until the
new one is Ready; a cache server with warm restart opens its port only after its restore,
so Ready means restored. Across StatefulSets (one per partition) nothing orders the
rollouts, so a spec change would restart one pod of every partition at once. The operator
therefore hands a changed template to one StatefulSet at a time: the next one gets its new
template only when every StatefulSet of the cluster has settled.

Pure functions over the desired and observed StatefulSet dicts.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

TEMPLATE_HASH = "cache.appliance.io/template-hash"


def template_hash(template: Mapping[str, Any]) -> str:
    """A short digest of a pod template as the operator builds it (before API defaults)."""
    text = json.dumps(template, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _name(obj: Mapping[str, Any]) -> str:
    return obj["metadata"]["name"]


def _applied_hash(sts: Mapping[str, Any]) -> str | None:
    return ((sts.get("metadata") or {}).get("annotations") or {}).get(TEMPLATE_HASH)


def settled(sts: Mapping[str, Any]) -> bool:
    """The StatefulSet's controller has seen its spec, and every pod runs the current
    template and is ready."""
    meta, spec, st = sts.get("metadata") or {}, sts.get("spec") or {}, sts.get("status") or {}
    replicas = spec.get("replicas", 0)
    if st.get("observedGeneration", 0) < meta.get("generation", 0):
        return False
    if st.get("updateRevision") and st.get("currentRevision") != st.get("updateRevision"):
        return False
    return st.get("updatedReplicas", 0) >= replicas and st.get("readyReplicas", 0) >= replicas


def held_statefulsets(
    desired: Sequence[Mapping[str, Any]], observed: Sequence[Mapping[str, Any]]
) -> dict[str, str]:
    """StatefulSets whose new template waits this pass, each with what it waits for.

    A StatefulSet that does not exist yet, or whose template is unchanged, is never held.
    Of those with a changed template, one that is unsettled already (its pods are being
    replaced or are failing) goes on, so that a fix for a broken partition is never held
    behind it; otherwise the first in order goes, once all StatefulSets have settled.
    """
    current = {_name(s): s for s in observed}
    changed = [
        _name(d)
        for d in desired
        if _name(d) in current and _applied_hash(current[_name(d)]) != _applied_hash(d)
    ]
    if not changed:
        return {}
    busy = sorted(name for name, sts in current.items() if not settled(sts))
    going = [name for name in changed if name in busy] or ([] if busy else changed[:1])
    waits_for = ", ".join(going or busy)
    return {name: waits_for for name in changed if name not in going}
