"""Whether each appliance really runs on CPUs of its own: pure, over what the appliances
reported (see appliances.py) and their pods.

An appliance has CPUs of its own when the kubelet gave its container a cpuset of exactly
the whole CPUs it asked for, smaller than the node's (the static CPU manager's exclusive
allocation: with the `none` policy every container may use every CPU of the node), and
each of its workers is bound to one CPU of that set, no two to the same one (`--pin`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from cacheoperator.appliances import ApplianceReport, Reading
from cacheoperator.naming import CONTAINER
from cacheoperator.quantity import to_decimal
from cacheserver.cpus import format_cpu_list

EXCLUSIVE, NOT_EXCLUSIVE, NOT_REPORTED = "Exclusive", "NotExclusive", "NotReported"
PINNING_OFF, NO_APPLIANCES = "PinningOff", "NoAppliances"
HINT = (
    "the kubelet gives a Guaranteed pod with whole CPUs exclusive ones only with its static "
    "CPU manager (cpuManagerPolicy: static)"
)


@dataclass(frozen=True)
class Verdict:
    pod: str
    kind: str  # EXCLUSIVE, NOT_EXCLUSIVE or NOT_REPORTED
    why: str = ""


def cpu_request(pod: Mapping[str, Any]) -> Decimal | None:
    """The CPU limit (= request) of the pod's server container."""
    for container in (pod.get("spec") or {}).get("containers") or []:
        if container.get("name") == CONTAINER:
            limit = ((container.get("resources") or {}).get("limits") or {}).get("cpu")
            try:
                return to_decimal(limit) if limit is not None else None
            except (ValueError, InvalidOperation):
                return None
    return None


def pod_verdict(
    pod: Mapping[str, Any], workers: Sequence[int], readings: Mapping[tuple[str, int], Reading]
) -> Verdict:
    name = (pod.get("metadata") or {}).get("name", "")
    node = (pod.get("spec") or {}).get("nodeName") or "its node"
    reports: list[tuple[int, ApplianceReport]] = []
    for worker in workers:
        reading = readings.get((name, worker))
        if reading is None:
            return Verdict(name, NOT_REPORTED, f"{name} has not reported yet")
        if isinstance(reading, str):
            return Verdict(name, NOT_REPORTED, f"{name}: {reading}")
        reports.append((worker, reading))
    if not reports:
        return Verdict(name, NOT_REPORTED, f"{name} has no workers to ask")
    allowed = reports[0][1].cpus_allowed
    online = reports[0][1].cpus_online
    if online is not None and allowed >= online:
        return Verdict(
            name,
            NOT_EXCLUSIVE,
            f"{name} may run on every CPU of {node} ({format_cpu_list(online)})",
        )
    wanted = cpu_request(pod)
    if wanted is not None and Decimal(len(allowed)) != wanted:
        return Verdict(
            name,
            NOT_EXCLUSIVE,
            f"{name} may run on CPUs {format_cpu_list(allowed)} of {node}, "
            f"not on {wanted} CPU(s) of its own",
        )
    taken: dict[int, int] = {}
    for worker, report in reports:
        if len(report.cpus) != 1:
            return Verdict(
                name,
                NOT_EXCLUSIVE,
                f"{name} worker {worker} is bound to CPUs {format_cpu_list(report.cpus)}, "
                "not to one",
            )
        (cpu,) = report.cpus
        if cpu in taken:
            return Verdict(
                name, NOT_EXCLUSIVE, f"{name} workers {taken[cpu]} and {worker} share CPU {cpu}"
            )
        taken[cpu] = worker
    return Verdict(name, EXCLUSIVE)


def pinned_condition(
    pinning: bool,
    pods: Sequence[Mapping[str, Any]],
    workers: Mapping[str, Sequence[int]],
    readings: Mapping[tuple[str, int], Reading],
) -> tuple[str, str, str]:
    """(status, reason, message) of the Pinned condition, from the ready pods, the workers
    each serves (their endpoints) and what has been read from them."""
    if not pinning:
        return (
            "False",
            PINNING_OFF,
            "spec.pinning is false: the appliances share the CPUs of their nodes",
        )
    verdicts = [
        pod_verdict(p, workers.get(n, ()), readings)
        for p in pods
        if (n := (p.get("metadata") or {}).get("name", "")) in workers
    ]
    if not verdicts:
        return ("Unknown", NO_APPLIANCES, "no appliance is ready to report its CPUs")
    shared = [v for v in verdicts if v.kind == NOT_EXCLUSIVE]
    if shared:
        names = ", ".join(v.pod for v in shared)
        return (
            "False",
            NOT_EXCLUSIVE,
            f"{len(shared)} of {len(verdicts)} appliance(s) without CPUs of their own "
            f"({names}): {'; '.join(v.why for v in shared)}. Hint: {HINT}.",
        )
    unknown = [v for v in verdicts if v.kind == NOT_REPORTED]
    if unknown:
        return (
            "Unknown",
            NOT_REPORTED,
            f"{len(unknown)} of {len(verdicts)} appliance(s) have not reported their CPUs: "
            + "; ".join(v.why for v in unknown),
        )
    return ("True", EXCLUSIVE, f"each of the {len(verdicts)} appliance(s) runs on CPUs of its own")
