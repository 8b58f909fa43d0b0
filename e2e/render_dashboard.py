"""Draw a Grafana dashboard of the chart to a PNG with matplotlib, from a real Prometheus.

Grafana is not installable offline here, so this stands in for a screenshot: the panels'
own queries (variables filled in) go to Prometheus' query_range API, and each panel is drawn
where its gridPos puts it: time series as lines, stats as their last value, tables from
instant queries merged on their labels. It reads the dashboard JSON the chart ships, so the
picture shows what those queries return, not a copy of them.

    python -m e2e.render_dashboard --prometheus http://127.0.0.1:9090 \\
        --dashboard charts/cache-operator/dashboards/cache-cluster-overview.json \\
        --var namespace=shop --var cachecluster=cache --minutes 30 --out overview.png

The e2e suite calls render() at the end of its observability run (test_observability.py).
"""

from __future__ import annotations

import argparse
import math
import re
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from e2e import monitoring
from e2e.prometheus import PrometheusAPI

GRID_COLUMNS = 24
DPI = 80
BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#d8d9da"
MUTED = "#8e8e8e"
PALETTE = ["#73bf69", "#f2cc0c", "#5794f2", "#ff780a", "#b877d9", "#f2495c", "#37872d",
           "#fade2a", "#1f60c4", "#8ab8ff"]  # fmt: skip


# ---- units, as Grafana names them -------------------------------------------------------


def _scaled(value: float, steps: list[tuple[float, str]], precision: int = 3) -> str:
    for factor, suffix in steps:
        if abs(value) >= factor:
            return f"{value / factor:.{precision}g}{suffix}"
    factor, suffix = steps[-1]
    return f"{value / factor:.{precision}g}{suffix}"


def fmt(value: float, unit: str) -> str:
    if value is None or math.isnan(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.1f}%"
    if unit == "bytes":
        return _scaled(value, [(2**30, " GiB"), (2**20, " MiB"), (2**10, " KiB"), (1, " B")])
    if unit == "Bps":
        return _scaled(value, [(2**20, " MiB/s"), (2**10, " KiB/s"), (1, " B/s")])
    if unit == "s":
        return _scaled(value, [(1, " s"), (1e-3, " ms"), (1e-6, " µs")])
    if unit in ("ops", "pps", "reqps"):
        return _scaled(value, [(1e6, "M/s"), (1e3, "k/s"), (1, "/s")])
    return _scaled(value, [(1e9, "G"), (1e6, "M"), (1e3, "k"), (1, "")])


def legend(template: str, labels: Mapping[str, str]) -> str:
    if not template or template == "__auto":
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return inner or "value"
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template)


# ---- drawing ----------------------------------------------------------------------------


def render(
    prometheus: PrometheusAPI,
    dashboard: Path,
    variables: Mapping[str, str],
    start: float,
    end: float,
    out: Path,
    caption: str = "",
) -> int:
    """Draw ``dashboard`` over [start, end] to ``out``; returns how many panels had data."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    board = monitoring.load_dashboard(dashboard)
    panels = board["panels"]
    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    # Geometry in pixels, as Grafana lays out its 24-column grid; converted at the end.
    width_px, row_px, header_px, gap = 1760, 30, 64, 4
    height_px = header_px + rows * row_px
    fig = plt.figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, facecolor=BACKGROUND)

    def box(x: float, y: float, w: float, h: float) -> tuple[float, float, float, float]:
        """(left, bottom, width, height) in figure fractions of a box given in pixels from
        the top-left corner."""
        return (x / width_px, 1 - (y + h) / height_px, w / width_px, h / height_px)

    title = f"{board['title']}   ·   " + ", ".join(
        f"{k}={variables[k]}" for k in ("namespace", "cachecluster") if k in variables
    )
    fig.text(8 / width_px, 1 - 22 / height_px, title, color=TEXT, fontsize=16, weight="bold",
             va="center")  # fmt: skip
    stamp = f"{_clock(start)} to {_clock(end)}"
    fig.text(1 - 8 / width_px, 1 - 22 / height_px, stamp, color=MUTED, fontsize=11, ha="right",
             va="center")  # fmt: skip
    if caption:
        fig.text(8 / width_px, 1 - 48 / height_px, caption, color=MUTED, fontsize=10,
                 va="center")  # fmt: skip

    step = max(1.0, (end - start) / 240)
    drawn = 0
    column_px = width_px / GRID_COLUMNS
    for panel in panels:
        pos = panel["gridPos"]
        x = pos["x"] * column_px + gap
        y = header_px + pos["y"] * row_px + gap
        w = pos["w"] * column_px - 2 * gap
        h = pos["h"] * row_px - 2 * gap
        if panel["type"] == "row":
            left, bottom, _, height = box(x, y, w, h)
            fig.text(left, bottom + height / 2, panel["title"], color=TEXT, fontsize=13,
                     weight="bold", va="center")  # fmt: skip
            continue
        frame = fig.add_axes(box(x, y, w, h))
        frame.set_facecolor(PANEL)
        frame.set_xticks([])
        frame.set_yticks([])
        for spine in frame.spines.values():
            spine.set_color(BORDER)
        frame.text(8 / w, 1 - 6 / h, panel["title"], transform=frame.transAxes, color=TEXT,
                   fontsize=11, weight="bold", va="top")  # fmt: skip
        unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
        if panel["type"] == "timeseries":
            # Room for the title above, tick labels left (and right, for a second axis) and
            # below.
            right = 62 if _has_right_axis(panel) else 12
            plot = box(x + 62, y + 30, w - 62 - right, h - 30 - 22)
            ok = _timeseries(fig, plot, panel, prometheus, variables, start, end, step, unit,
                             mdates)  # fmt: skip
        elif panel["type"] == "stat":
            ok = _stat(frame, panel, prometheus, variables, start, end, step, unit)
        elif panel["type"] == "table":
            ok = _table(frame, panel, prometheus, variables, end)
        else:
            ok = False
        drawn += bool(ok)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, facecolor=BACKGROUND)
    plt.close(fig)
    return drawn


def _clock(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%H:%M:%S")


def _range(prometheus, target, variables, start, end, step):
    expr = monitoring.substitute(target["expr"], variables)
    return prometheus.query_range(expr, start, end, step)


def _timeseries(fig, box, panel, prometheus, variables, start, end, step, unit, mdates) -> bool:
    ax = fig.add_axes(box)
    ax.set_facecolor(PANEL)
    overrides = _overrides(panel)
    right = None
    color = 0
    any_data = False
    zeros: set[str] = set()
    for target in panel["targets"]:
        for series in _range(prometheus, target, variables, start, end, step):
            name = legend(target.get("legendFormat", ""), series["metric"])
            times = [datetime.fromtimestamp(float(t)) for t, _ in series["values"]]
            values = [float(v) for _, v in series["values"]]
            if all(math.isnan(v) for v in values):
                continue
            any_data = True
            flat = all(v == 0 for v in values if not math.isnan(v))
            if flat:
                zeros.add(name)
            axis = ax
            series_unit = unit
            for pattern, props in overrides:
                if re.fullmatch(pattern, name):
                    series_unit = props.get("unit", unit)
                    if props.get("custom.axisPlacement") == "right":
                        right = right or ax.twinx()
                        axis = right
            # Series that stayed at 0 are drawn dim, so the palette goes to those that moved.
            line_color = MUTED if flat else PALETTE[color % len(PALETTE)]
            axis.plot(times, values, color=line_color, linewidth=1.4, label=name)
            axis.yaxis.set_major_formatter(_formatter(series_unit))
            color += not flat
    for axis in (ax, right):
        if axis is None:
            continue
        axis.tick_params(colors=MUTED, labelsize=8)
        for spine in axis.spines.values():
            spine.set_visible(False)
        axis.grid(color=BORDER, linewidth=0.6)
        axis.set_ylim(bottom=0)
    ax.set_xlim(datetime.fromtimestamp(start), datetime.fromtimestamp(end))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))
    if any_data:
        handles, labels = ax.get_legend_handles_labels()
        if right is not None:
            more = right.get_legend_handles_labels()
            handles, labels = handles + more[0], labels + more[1]
        # Like Grafana's "hide zeros" legend option: series that stayed at 0 are left out of
        # the legend (not out of the plot), unless nothing else is there.
        shown = [(hd, lb) for hd, lb in zip(handles, labels, strict=True) if lb not in zeros]
        handles, labels = map(list, zip(*shown, strict=True)) if shown else (handles, labels)
        legend_box = ax.legend(handles, labels, loc="upper left", fontsize=8, framealpha=0.6,
                               facecolor=PANEL, edgecolor=PANEL, labelcolor=TEXT,
                               ncol=min(4, len(labels)))  # fmt: skip
        legend_box.set_zorder(5)
    else:
        ax.text(0.5, 0.5, "No data", transform=ax.transAxes, color=MUTED, ha="center")
    return any_data


def _has_right_axis(panel) -> bool:
    return any(p.get("custom.axisPlacement") == "right" for _, p in _overrides(panel))


def _overrides(panel) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override["matcher"]
        pattern = (
            matcher["options"] if matcher["id"] == "byRegexp" else re.escape(matcher["options"])
        )
        out.append((pattern, {p["id"]: p["value"] for p in override["properties"]}))
    return out


def _formatter(unit: str):
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: fmt(v, unit))


def _stat(frame, panel, prometheus, variables, start, end, step, unit) -> bool:
    (target,) = panel["targets"]
    series = _range(prometheus, target, variables, start, end, step)
    values = [float(v) for s in series for _, v in s["values"]]
    last = next((v for v in reversed(values) if not math.isnan(v)), float("nan"))
    color = _threshold_color(panel, last)
    frame.text(0.5, 0.42, fmt(last, unit), transform=frame.transAxes, color=color, fontsize=26,
               weight="bold", ha="center", va="center")  # fmt: skip
    return not math.isnan(last)


def _threshold_color(panel, value: float) -> str:
    steps = panel["fieldConfig"]["defaults"].get("thresholds", {}).get("steps", [])
    colors = {"green": "#73bf69", "orange": "#ff9830", "red": "#f2495c"}
    color = "#73bf69"
    for threshold in steps:
        if threshold["value"] is None or (not math.isnan(value) and value >= threshold["value"]):
            color = colors.get(threshold["color"], threshold["color"])
    return color


def _table(frame, panel, prometheus, variables, at: float) -> bool:
    organize = next(
        (t["options"] for t in panel.get("transformations", []) if t["id"] == "organize"), {}
    )
    rename = organize.get("renameByName", {})
    units = {
        o["matcher"]["options"]: next(p["value"] for p in o["properties"] if p["id"] == "unit")
        for o in panel.get("fieldConfig", {}).get("overrides", [])
    }
    rows: dict[tuple, dict[str, str]] = {}
    keys: list[str] = []
    columns: list[str] = []
    for target in panel["targets"]:
        column = rename.get(f"Value #{target['refId']}", target["refId"])
        columns.append(column)
        expr = monitoring.substitute(target["expr"], variables)
        for sample in prometheus.query(expr, at):
            labels = sample["metric"]
            for k in labels:
                if k not in keys:
                    keys.append(k)
            row_key = tuple(sorted(labels.items()))
            row = rows.setdefault(row_key, dict(labels))
            row[column] = fmt(float(sample["value"][1]), units.get(column, "short"))
    if not rows:
        frame.text(0.5, 0.5, "No data", transform=frame.transAxes, color=MUTED, ha="center")
        return False
    order = organize.get("indexByName", {})
    keys.sort(key=lambda k: order.get(k, 99))
    header = keys + columns
    body = [[row.get(c, "") for c in header] for _, row in sorted(rows.items())]
    table = frame.table(cellText=body, colLabels=header, loc="upper center", cellLoc="left",
                        bbox=(0.01, 0.02, 0.98, 0.86))  # fmt: skip
    table.auto_set_font_size(False)
    table.set_fontsize(10)
    for (r, _c), cell in table.get_celld().items():
        cell.set_edgecolor(BORDER)
        cell.set_facecolor("#22252b" if r == 0 else PANEL)
        cell.get_text().set_color(TEXT if r else "#33a2e5")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.render_dashboard", description=__doc__)
    parser.add_argument("--prometheus", required=True, help="base URL, e.g. http://127.0.0.1:9090")
    parser.add_argument("--dashboard", type=Path, default=monitoring.DASHBOARDS[0])
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--minutes", type=float, default=30, help="the last N minutes")
    parser.add_argument("--start", type=float, help="unix time (instead of --minutes)")
    parser.add_argument("--end", type=float, help="unix time (default: now)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    variables = {**monitoring.DEFAULT_BUILTINS, "job": "cacheserver", "namespace": ".*",
                 "cachecluster": ".*", "datasource": "prometheus"}  # fmt: skip
    for item in args.var:
        name, _, value = item.partition("=")
        variables[name] = value
    end = args.end or time.time()
    start = args.start or end - args.minutes * 60
    drawn = render(PrometheusAPI(args.prometheus), args.dashboard, variables, start, end, args.out)
    print(f"{args.out}: {drawn} panels with data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
