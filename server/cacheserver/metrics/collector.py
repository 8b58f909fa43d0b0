"""Prometheus collector of one worker: its ``stats`` lines, read at scrape time and exported
as the metric families of ``metrics/table.py``. The supervisor of ``-t N`` turns its
workers' lines into metrics with the same ``families`` (``metrics/aggregate.py``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cacheserver.metrics import table
from cacheserver.metrics.identity import PodIdentity
from cacheserver.metrics.latency import histogram_from_stats
from cacheserver.metrics.stats_report import StatsReport
from cacheserver.metrics.table import UP, Family

# One worker's reading: the values of its labels (``worker``, or none), and its stats lines.
Reading = tuple[tuple[str, ...], Mapping[str, str]]


def families(readings: Sequence[Reading], labels: tuple[str, ...] = ()) -> Iterator[Metric]:
    """The table's families that read stats lines, from the readings given; a family no
    reading has lines for (a feature that is off) is left out."""
    for family in table.FAMILIES:
        if family.series or family.label_stats:
            metric = _family(family, readings, labels)
            if metric.samples:
                yield metric


def _family(family: Family, readings: Sequence[Reading], labels: tuple[str, ...]) -> Metric:
    if family.kind == "histogram":
        histogram = HistogramMetricFamily(family.name, family.help, labels=labels)
        ((_, prefix),) = family.series
        for values, stats in readings:
            found = histogram_from_stats(stats, prefix)
            if found is not None:
                histogram.add_metric(list(values), found[0], sum_value=found[1])
        return histogram
    if family.kind == "info":
        info = InfoMetricFamily(family.name.removesuffix("_info"), family.help, labels=labels)
        for values, stats in readings:
            found = _label_values(family, stats)
            if found is not None:
                info.add_metric(list(values), found)
        return info
    kind = CounterMetricFamily if family.kind == "counter" else GaugeMetricFamily
    metric = kind(family.name, family.help, labels=[*labels, *family.labels])
    for values, stats in readings:
        if family.label_stats:
            found = _label_values(family, stats)
            if found is not None:
                metric.add_metric([*values, *found.values()], 1)
            continue
        for series_labels, key in family.series:
            if key in stats:
                metric.add_metric([*values, *series_labels], family.parse(stats[key]))
    return metric


def _label_values(family: Family, stats: Mapping[str, str]) -> dict[str, str] | None:
    if not all(key in stats for _, key in family.label_stats):
        return None
    # memcached writes "-" for nothing; in PromQL an empty label is no label.
    return {label: "" if stats[key] == "-" else stats[key] for label, key in family.label_stats}


class ServerCollector(Collector):
    def __init__(self, report: StatsReport, identity: PodIdentity | None = None) -> None:
        self._report = report
        self._identity = identity if identity is not None else PodIdentity.from_env()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(UP.name, UP.help, value=1)
        yield from self._identity.metrics()
        yield from families([((), self._report.reading())])
