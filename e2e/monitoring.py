"""The chart's monitoring files as data: every PromQL expression of the Grafana dashboards and
of the alert rules, Grafana's variables substituted, checked by promtool, and the chart
rendered by the pinned helm.

Used by the static checks (e2e/tests/test_monitoring_files.py), by the live proof against a
real Prometheus (e2e/tests/test_observability.py) and by e2e/render_dashboard.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from e2e.base import REPO_ROOT, versions

CHART = REPO_ROOT / "charts" / "cache-operator"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
RULE_FILES = sorted((CHART / "rules").glob("*.yaml"))
ALERT_TESTS = REPO_ROOT / "e2e" / "promtool" / "alerts_test.yaml"

# Grafana's built-in interval variables, as the static checks and the e2e run fill them in.
DEFAULT_BUILTINS = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?:(.*),\s*)?(\w+)\s*\)\s*$", re.S)


class PromtoolError(AssertionError):
    pass


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a dashboard: a panel target or a variable's query."""

    dashboard: str
    panel: str
    ref: str
    expr: str
    legend: str = ""
    instant: bool = False

    @property
    def where(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref}"


@dataclass(frozen=True)
class Alert:
    group: str
    name: str
    expr: str
    duration: str


def substitute(expr: str, variables: Mapping[str, str]) -> str:
    """``expr`` with Grafana's $var, ${var}, ${var:format} and [[var]] replaced."""

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in variables:
            raise KeyError(f"no value for the dashboard variable ${name} in {expr!r}")
        return variables[name]

    return _VARIABLE.sub(value, expr)


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def _panels(panels: list[dict]) -> Iterator[dict]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # rows may hold collapsed panels


def dashboard_queries(path: Path) -> list[Query]:
    """Every expression of one dashboard. A variable's ``label_values(selector, label)``
    contributes its selector (the part Prometheus evaluates)."""
    board = load_dashboard(path)
    title = board["title"]
    queries = []
    for panel in _panels(board.get("panels", [])):
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append(
                    Query(
                        title,
                        panel.get("title", "?"),
                        target.get("refId", "?"),
                        target["expr"],
                        target.get("legendFormat", ""),
                        bool(target.get("instant")),
                    )
                )
    for variable in board.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable["query"]
        text = query["query"] if isinstance(query, dict) else query
        match = _LABEL_VALUES.match(text)
        selector = match.group(1) if match else text
        if selector:
            queries.append(Query(title, f"variable {variable['name']}", "query", selector))
    return queries


def all_dashboard_queries() -> list[Query]:
    return [q for path in DASHBOARDS for q in dashboard_queries(path)]


def dashboard_variables(path: Path) -> list[str]:
    return [v["name"] for v in load_dashboard(path).get("templating", {}).get("list", [])]


def alerts() -> list[Alert]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    found.append(
                        Alert(group["name"], rule["alert"], rule["expr"], rule.get("for", "0s"))
                    )
    return found


# ---- promtool ---------------------------------------------------------------------------


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise PromtoolError("promtool is not installed: run scripts/bootstrap.sh")
    return path


def _run_promtool(*args: str, cwd: Path | None = None) -> str:
    result = subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, cwd=cwd
    )
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise PromtoolError(f"promtool {' '.join(args)} failed:\n{output}")
    return output


def check_rule_files(*paths: Path) -> str:
    return _run_promtool("check", "rules", *map(str, paths))


def check_expressions(exprs: Mapping[str, str]) -> str:
    """Parse every expression with promtool: each becomes a recording rule of one synthetic
    rule file, which `promtool check rules` parses (one error names the rule)."""
    rules = [{"record": f"check:expr_{i}", "expr": e} for i, e in enumerate(exprs.values())]
    names = {f"check:expr_{i}": where for i, where in enumerate(exprs)}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "expressions.rules.yaml"
        path.write_text(yaml.safe_dump({"groups": [{"name": "expressions", "rules": rules}]}))
        try:
            return check_rule_files(path)
        except PromtoolError as e:
            message = str(e)
            for record, where in names.items():
                message = message.replace(f'"{record}"', f'"{record}" ({where})')
            raise PromtoolError(message) from None


def run_alert_unit_tests() -> str:
    """`promtool test rules` on e2e/promtool/alerts_test.yaml (paths relative to it)."""
    return _run_promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)


# ---- helm -------------------------------------------------------------------------------


def helm_template(
    helm: Path, values: Mapping | None = None, namespace: str = "cache-system"
) -> list[dict]:
    """The chart rendered by ``helm template`` with ``values``: its objects, in order."""
    with tempfile.TemporaryDirectory() as tmp:
        values_file = Path(tmp) / "values.yaml"
        values_file.write_text(yaml.safe_dump(dict(values or {})))
        result = subprocess.run(
            [
                str(helm),
                "template",
                "cache-operator",
                str(CHART),
                "--namespace",
                namespace,
                "--values",
                str(values_file),
                # The chart's kubeVersion check needs the cluster's version (helm assumes old).
                "--kube-version",
                versions()["KUBERNETES_VERSION"],
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env={"HOME": tmp, "PATH": "/usr/bin:/bin"},
        )
    if result.returncode != 0:
        raise AssertionError(f"helm template failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


MONITORS_ON = {
    "monitoring": {
        "podMonitor": {"enabled": True},
        "serviceMonitor": {"enabled": True},
        "prometheusRule": {"enabled": True},
    }
}


def of_kind(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]
