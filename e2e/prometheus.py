"""A real Prometheus for the e2e suite: a process on loopback with a generated configuration,
and a small client for its HTTP API. The binary is upstream Prometheus built from its Go
module by `make e2e-bins` (Debian's package, which gives the suite promtool, leaves out the
Kubernetes service discovery).

The scrape configuration for the cache appliances is generated from the chart's rendered
PodMonitor the way the Prometheus Operator turns a PodMonitor into a scrape job (pod role
discovery, keep the selected pods and the named port, namespace/pod/container/job/endpoint
labels, then the PodMonitor's own relabelings), so the relabelings the e2e run exercises
are the chart's.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2e import procs
from e2e.base import ClusterError, wait_for
from e2e.base import binary as cluster_binary
from testkit.net import free_port

START_TIMEOUT = 60.0


class PrometheusError(RuntimeError):
    pass


def binary() -> str:
    try:
        return str(cluster_binary("prometheus"))
    except ClusterError as e:
        raise PrometheusError(str(e)) from None


# ---- scrape configuration from a PodMonitor ---------------------------------------------


def _sanitize(label: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def _relabel(rule: Mapping[str, Any]) -> dict[str, Any]:
    """A monitoring.coreos.com RelabelConfig (camelCase) as Prometheus writes it."""
    keys = {
        "sourceLabels": "source_labels",
        "targetLabel": "target_label",
        "separator": "separator",
        "regex": "regex",
        "modulus": "modulus",
        "replacement": "replacement",
        "action": "action",
    }
    out = {keys[k]: v for k, v in rule.items() if k in keys}
    if "action" in out:
        out["action"] = out["action"].lower()
    return out


@dataclass(frozen=True)
class _MonitorKind:
    """How the Prometheus Operator turns one kind of monitor into scrape jobs."""

    name: str  # podMonitor, serviceMonitor
    role: str  # the kubernetes_sd role
    endpoints: str  # where the monitor lists its endpoints
    selected: str  # whose labels its selector matches: pod, service
    port_label: str  # the meta label naming the target's port
    targets: tuple[tuple[str, str], ...]  # meta label -> target label
    drop_finished_pods: bool


PODMONITOR = _MonitorKind(
    "podMonitor",
    "pod",
    "podMetricsEndpoints",
    "pod",
    "__meta_kubernetes_pod_container_port_name",
    (
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_pod_container_name", "container"),
        ("__meta_kubernetes_pod_name", "pod"),
    ),
    drop_finished_pods=True,
)
SERVICEMONITOR = _MonitorKind(
    "serviceMonitor",
    "endpoints",
    "endpoints",
    "service",
    "__meta_kubernetes_endpoint_port_name",
    (
        ("__meta_kubernetes_namespace", "namespace"),
        ("__meta_kubernetes_service_name", "service"),
        ("__meta_kubernetes_pod_name", "pod"),
    ),
    drop_finished_pods=False,
)


def podmonitor_scrape_configs(
    podmonitor: Mapping[str, Any], kubernetes_sd: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The scrape jobs the Prometheus Operator makes of ``podmonitor``; ``kubernetes_sd``
    holds how to reach the API server (api_server, tls_config, ...)."""
    return _scrape_configs(PODMONITOR, podmonitor, kubernetes_sd)


def servicemonitor_scrape_configs(
    servicemonitor: Mapping[str, Any], kubernetes_sd: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The scrape jobs the Prometheus Operator makes of ``servicemonitor``: endpoints
    discovery of the Services its selector picks, one job per endpoint port."""
    return _scrape_configs(SERVICEMONITOR, servicemonitor, kubernetes_sd)


def _scrape_configs(
    kind: _MonitorKind, monitor: Mapping[str, Any], kubernetes_sd: Mapping[str, Any]
) -> list[dict[str, Any]]:
    meta, spec = monitor["metadata"], monitor["spec"]
    namespace, name = meta["namespace"], meta["name"]
    sd: dict[str, Any] = {"role": kind.role, **kubernetes_sd}
    selector = spec.get("namespaceSelector") or {}
    if not selector.get("any"):
        sd["namespaces"] = {"names": list(selector.get("matchNames") or [namespace])}
    if (spec.get("attachMetadata") or {}).get("node"):
        sd["attach_metadata"] = {"node": True}
    if spec["selector"].get("matchExpressions"):
        raise PrometheusError(f"matchExpressions in a {kind.name} selector are not translated")

    jobs = []
    for i, endpoint in enumerate(spec[kind.endpoints]):
        relabel: list[dict[str, Any]] = []
        if kind.drop_finished_pods:  # pods that ended are no targets
            relabel.append(
                {
                    "source_labels": ["__meta_kubernetes_pod_phase"],
                    "action": "drop",
                    "regex": "(Failed|Succeeded)",
                }
            )
        for key, value in sorted(spec["selector"].get("matchLabels", {}).items()):
            label = f"__meta_kubernetes_{kind.selected}_label"
            relabel.append(
                {
                    "source_labels": [
                        f"{label}_{_sanitize(key)}",
                        f"{label}present_{_sanitize(key)}",
                    ],
                    "action": "keep",
                    "regex": f"({value});true",
                }
            )
        relabel.append(
            {"source_labels": [kind.port_label], "action": "keep", "regex": endpoint["port"]}
        )
        for source, target in kind.targets:
            relabel.append({"source_labels": [source], "target_label": target})
        relabel.append({"target_label": "job", "replacement": f"{namespace}/{name}"})
        relabel.append({"target_label": "endpoint", "replacement": endpoint["port"]})
        relabel += [_relabel(r) for r in endpoint.get("relabelings", [])]
        job: dict[str, Any] = {
            "job_name": f"{kind.name}/{namespace}/{name}/{i}",
            "metrics_path": endpoint.get("path", "/metrics"),
            "kubernetes_sd_configs": [sd],
            "relabel_configs": relabel,
        }
        if endpoint.get("honorLabels"):
            job["honor_labels"] = True
        if endpoint.get("interval"):
            job["scrape_interval"] = endpoint["interval"]
        if endpoint.get("scrapeTimeout"):
            job["scrape_timeout"] = endpoint["scrapeTimeout"]
        if endpoint.get("metricRelabelings"):
            job["metric_relabel_configs"] = [_relabel(r) for r in endpoint["metricRelabelings"]]
        jobs.append(job)
    return jobs


def scale_for_durations(groups: list[dict[str, Any]], duration: str) -> list[dict[str, Any]]:
    """The rule groups with every alert's ``for:`` set to ``duration``, so an e2e run sees an
    alert fire in seconds; the real durations are checked by promtool's unit tests."""
    scaled = []
    for group in groups:
        rules = [
            {**rule, "for": duration} if "alert" in rule and "for" in rule else dict(rule)
            for rule in group["rules"]
        ]
        scaled.append({**group, "rules": rules})
    return scaled


# ---- the HTTP API ----------------------------------------------------------------------


class PrometheusAPI:
    """The parts of Prometheus' HTTP API the tests and the dashboard renderer use."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as e:
            body = json.load(e)
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector, or [scalar] for a scalar)."""
        data = self.api("query", query=expr, time=at)
        return data["result"] if data["resultType"] != "scalar" else [data["result"]]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def targets(self) -> list[dict[str, Any]]:
        return self.api("targets", state="active")["activeTargets"]

    def alerts(self) -> list[dict[str, Any]]:
        return self.api("alerts")["alerts"]

    def firing(self, name: str) -> list[dict[str, Any]]:
        alerts = self.alerts()
        return [a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"]

    def rules(self) -> list[dict[str, Any]]:
        return [r for g in self.api("rules")["groups"] for r in g["rules"]]


# ---- the process ------------------------------------------------------------------------


class Prometheus(PrometheusAPI):
    """``prometheus`` on 127.0.0.1 with ``scrape_configs`` and rule ``groups``, its data
    and log in ``workdir``."""

    def __init__(
        self,
        workdir: Path,
        scrape_configs: list[dict[str, Any]],
        rule_groups: list[dict[str, Any]] | None = None,
        interval: str = "1s",
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.config = {
            "global": {
                "scrape_interval": interval,
                "scrape_timeout": interval,
                "evaluation_interval": interval,
            },
            "scrape_configs": scrape_configs,
        }
        self.rule_groups = rule_groups or []
        self.record: procs.ProcessRecord | None = None
        self._popen = None

    @property
    def log(self) -> Path:
        return self.workdir / "prometheus.log"

    def start(self, timeout: float = START_TIMEOUT) -> Prometheus:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        if self.rule_groups:
            rules = self.workdir / "rules.yaml"
            rules.write_text(yaml.safe_dump({"groups": self.rule_groups}, sort_keys=False))
            self.config["rule_files"] = [str(rules)]
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        argv = [
            binary(),
            f"--config.file={config}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=info",
        ]
        if shutil.which("setpriv"):
            # The kernel ends it with the test run, even a SIGKILLed one.
            argv = ["setpriv", "--pdeathsig", "TERM", "--", *argv]
        self.record, self._popen = procs.start("prometheus", argv, self.log, cwd=self.workdir)

        def ready() -> bool:
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200

        try:
            wait_for("prometheus /-/ready", ready, timeout, on_poll=self._check_alive)
        except ClusterError as e:
            self.stop()
            raise PrometheusError(f"{e}\n{procs.tail(self.log, 30)}") from None
        return self

    def _check_alive(self) -> None:
        if self.record is not None and not self.record.alive():
            raise PrometheusError(f"prometheus exited:\n{procs.tail(self.log, 30)}")

    def stop(self) -> None:
        if self.record is not None:
            self.record.stop(grace=10, popen=self._popen)

    def log_tail(self, lines: int = 30) -> str:
        return procs.tail(self.log, lines)
