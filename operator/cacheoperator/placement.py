"""Scheduling constraints per placement strategy, after EC2 placement groups.

cluster    pods need a zone shared with the cluster's other pods, and prefer its rack.
spread     no two pods share a host (or a rack); a hard cap of maxPerZone pods per zone,
           spread evenly across zones when the scheduler can.
partition  pods carry their partition number; pods of different partitions never share
           a rack, so losing a rack loses at most one partition. Pods prefer the racks
           their partition already uses, so a partition does not take more racks than it
           needs and leave the later partitions none.

The constraints that rely on a node label also require that label on the node: without it
the scheduler would quietly treat every unlabelled node as its own zone or rack.
"""

from __future__ import annotations

from typing import Any

from cacheoperator.models import MAX_REPLICAS, CacheClusterSpec
from cacheoperator.naming import LABEL_CLUSTER, LABEL_PARTITION, selector_labels, statefulset_name

HOSTNAME_KEY = "kubernetes.io/hostname"
# Topology spread compares a zone's count with the *smallest* zone's. When there are fewer
# eligible zones than minDomains, the scheduler takes that minimum as 0, which turns
# maxSkew into an absolute cap per zone. With more zones than pods some zone is always
# empty, so the minimum is 0 anyway: any value above the replica limit gives a true cap.
# It is a constant on purpose: a value that followed spec.replicas would change the pod
# template, and so restart every pod, on each scale.
MIN_DOMAINS_FOR_CAP = MAX_REPLICAS + 1


def _own_pods(cluster: str) -> dict[str, Any]:
    return {"matchLabels": selector_labels(cluster)}


def _require_labels(*keys: str) -> dict[str, Any]:
    return {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [
                {"matchExpressions": [{"key": key, "operator": "Exists"} for key in keys]}
            ]
        }
    }


def affinity(spec: CacheClusterSpec, cluster: str, partition: int | None) -> dict[str, Any]:
    placement = spec.placement
    if placement.strategy == "cluster":
        return {
            "nodeAffinity": _require_labels(placement.zone_key),
            "podAffinity": {
                # The first pod matches no one; the scheduler lets a pod that matches its own
                # term start the group, so the cluster can bootstrap.
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"labelSelector": _own_pods(cluster), "topologyKey": placement.zone_key}
                ],
                "preferredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": _own_pods(cluster),
                            "topologyKey": placement.rack_key,
                        },
                    }
                ],
            },
        }
    if placement.strategy == "spread":
        by_rack = placement.effective_spread_level == "rack"
        keys = (placement.zone_key, placement.rack_key) if by_rack else (placement.zone_key,)
        return {
            "nodeAffinity": _require_labels(*keys),
            "podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {
                        "labelSelector": _own_pods(cluster),
                        "topologyKey": placement.rack_key if by_rack else HOSTNAME_KEY,
                    }
                ]
            },
        }
    if partition is None:
        raise ValueError("strategy partition needs a partition number")
    own_partition = {"matchLabels": {LABEL_CLUSTER: cluster, LABEL_PARTITION: str(partition)}}
    return {
        "nodeAffinity": _require_labels(placement.rack_key),
        # Without this the scheduler's default spreading puts a partition's pods in
        # different zones, hence racks: with 4 racks, 2 partitions of 2 pods can take all 4.
        "podAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "labelSelector": own_partition,
                        "topologyKey": placement.rack_key,
                    },
                }
            ]
        },
        "podAntiAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": [
                {
                    "labelSelector": {
                        "matchLabels": {LABEL_CLUSTER: cluster},
                        "matchExpressions": [
                            {
                                "key": LABEL_PARTITION,
                                "operator": "NotIn",
                                "values": [str(partition)],
                            }
                        ],
                    },
                    "topologyKey": placement.rack_key,
                }
            ]
        },
    }


def topology_spread(spec: CacheClusterSpec, cluster: str) -> list[dict[str, Any]]:
    placement = spec.placement
    if placement.strategy != "spread":
        return []
    return [
        {
            # Hard: never more than maxPerZone pods in one zone (see MIN_DOMAINS_FOR_CAP).
            "maxSkew": placement.effective_max_per_zone,
            "minDomains": MIN_DOMAINS_FOR_CAP,
            "topologyKey": placement.zone_key,
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": _own_pods(cluster),
        },
        {
            # Soft: and as even as the nodes allow.
            "maxSkew": 1,
            "topologyKey": placement.zone_key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": _own_pods(cluster),
        },
    ]


def partition_sizes(spec: CacheClusterSpec) -> list[tuple[int | None, int]]:
    """(partition number or None, replicas) per StatefulSet; partitions count from 1, as EC2's."""
    if spec.placement.strategy != "partition":
        return [(None, spec.replicas)]
    count = spec.placement.partition_count
    base, extra = divmod(spec.replicas, count)
    return [(p, base + (1 if p <= extra else 0)) for p in range(1, count + 1)]


def pod_names(cluster: str, spec: CacheClusterSpec) -> list[str]:
    """The pods the spec asks for, partition by partition, ordinal by ordinal."""
    return [
        f"{statefulset_name(cluster, partition)}-{ordinal}"
        for partition, replicas in partition_sizes(spec)
        for ordinal in range(replicas)
    ]
