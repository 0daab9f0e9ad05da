"""The chart's Grafana dashboards without Grafana: their PromQL, evaluated against a Prometheus,
and PNG renderings (matplotlib) of what a user would see.

    python -m tuneloom_dev.dashboards --prometheus http://127.0.0.1:9090 --since 900 --out docs/dashboards
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneloom_dev.prometheus import Prometheus

DASHBOARDS_DIR = Path(__file__).resolve().parents[2] / "charts" / "tuneloom" / "dashboards"
# What Grafana puts in for its built-in interval variables; one minute covers a few 1 s scrapes
# in tests and several 30 s scrapes on a cluster.
BUILTIN_VARIABLES = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}


@dataclass(frozen=True)
class PanelQuery:
    dashboard: str
    panel: str
    expr: str
    legend: str


def load_dashboards(directory: Path = DASHBOARDS_DIR) -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in sorted(directory.glob("*.json"))}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels in order, including those nested in rows."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return [p for p in found if p.get("type") != "row"]


def expand(expr: str, dashboard: dict[str, Any]) -> str:
    """The expression with template variables as 'All' selects them (their allValue, else .*)."""
    values = dict(BUILTIN_VARIABLES)
    for variable in dashboard.get("templating", {}).get("list", []):
        values.setdefault(variable["name"], variable.get("allValue") or ".*")

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        return values.get(name, match.group(0))

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", replace, expr)


def panel_queries(name: str, dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [
        PanelQuery(name, panel.get("title", "?"), expand(target["expr"], dashboard), target.get("legendFormat", ""))
        for panel in _panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def _legend(template: str, labels: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()
    return text or ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__") or "value"


def render(name: str, dashboard: dict[str, Any], prometheus: Prometheus, start: float, end: float, out: Path) -> Path:
    """One PNG with a small chart per panel, from query_range over [start, end]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in _panels(dashboard) if any(t.get("expr") for t in p.get("targets", []))]
    columns = 3
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(6 * columns, 3.2 * rows), squeeze=False)
    step = max((end - start) / 200, 1)
    for axis, panel in zip(axes.flat, panels, strict=False):
        axis.set_title(panel.get("title", ""), fontsize=10, loc="left")
        for target in panel["targets"]:
            if not target.get("expr"):
                continue
            for series in prometheus.query_range(expand(target["expr"], dashboard), start, end, step):
                times = [float(t) - end for t, _ in series["values"]]
                values = [float(v) for _, v in series["values"]]
                axis.plot(times, values, label=_legend(target.get("legendFormat", ""), series["metric"])[:40])
        axis.set_xlabel("seconds before now", fontsize=8)
        axis.tick_params(labelsize=8)
        if axis.lines:
            axis.legend(fontsize=7, loc="best")
        else:
            axis.text(0.5, 0.5, "no data", ha="center", va="center", transform=axis.transAxes, color="grey")
    for axis in list(axes.flat)[len(panels) :]:
        axis.axis("off")
    figure.suptitle(dashboard.get("title", name), fontsize=13, x=0.01, ha="left")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=80)
    plt.close(figure)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prometheus", required=True, help="base URL of a Prometheus holding tuneloom's series")
    parser.add_argument("--since", type=float, default=900, help="seconds of history to draw")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboards"))
    args = parser.parse_args(argv)
    prometheus = Prometheus.attach(args.prometheus)
    end = time.time()
    for name, dashboard in load_dashboards().items():
        print(render(name, dashboard, prometheus, end - args.since, end, args.out / f"{name}.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
