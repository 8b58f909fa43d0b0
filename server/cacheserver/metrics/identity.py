"""Where this appliance runs, as its pod's downward-API environment says: read once at start
and exported as one info metric (like EC2 instance metadata: the pod knows its partition).

Prometheus' own Kubernetes labels (the chart's PodMonitor adds node, zone, rack and
partition) are the usual way to place a pod; this series places it for a scrape setup that
adds none, e.g. one that follows the pods' prometheus.io/* annotations.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from prometheus_client.core import InfoMetricFamily

from cacheserver.metrics.table import POD

# Label names differ from the usual target labels (pod, node, partition), which a scrape
# config may add itself: a clash would rename ours to exported_<name>.
_ENV_LABELS = (
    ("POD_NAME", "pod_name"),
    ("NODE_NAME", "node_name"),
    ("HOST_IP", "host_ip"),
    ("CACHESERVER_PARTITION", "partition_number"),
)


@dataclass(frozen=True)
class PodIdentity:
    labels: tuple[tuple[str, str], ...]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PodIdentity:
        env = os.environ if env is None else env
        return cls(tuple((label, env.get(var, "")) for var, label in _ENV_LABELS))

    def metrics(self) -> Iterator[InfoMetricFamily]:
        info = InfoMetricFamily(POD.name.removesuffix("_info"), POD.help)
        # An unset variable leaves its label out (in PromQL an empty label is no label).
        info.add_metric([], {name: value for name, value in self.labels if value})
        yield info
