"""Render the Grafana dashboard's panels from a live Prometheus into one PNG (Grafana cannot run here).

    python deploy/render_dashboard.py --prometheus http://127.0.0.1:9090 --minutes 10 --out docs/dashboard.png

Each panel becomes a subplot; each of its queries is evaluated with Prometheus's query_range API
(`$__rate_interval`, `$__range` and `$job` substituted) and drawn as it would be in Grafana.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from pathlib import Path

import httpx

DASHBOARD = Path(__file__).parent / "grafana" / "dashboards" / "alit.json"


def concrete(expr: str, rate_interval: str = "30s", rng: str = "10m", job: str = ".*", model: str = ".*") -> str:
    """A panel query with Grafana's variables filled in (`job`, `model`: regexes; ".*" is Grafana's All)."""
    return (expr.replace("$__rate_interval", rate_interval).replace("$__range", rng).replace("$job", job)
            .replace("$model", model))


def panel_queries(dashboard: dict) -> list[tuple[str, list[tuple[str, str]]]]:
    return [(p["title"], [(t["expr"], t.get("legendFormat", "")) for t in p.get("targets", [])]) for p in dashboard["panels"]]


def legend(fmt: str, labels: dict) -> str:
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or json.dumps(labels)


def render(prometheus: str, out: str, minutes: float, step: float = 2.0, job: str = ".*") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dash = json.loads(DASHBOARD.read_text())
    panels = panel_queries(dash)
    end = time.time()
    start = end - minutes * 60
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, queries) in zip(axes.flat, panels):
        for expr, fmt in queries:
            r = httpx.get(f"{prometheus}/api/v1/query_range", params={
                "query": concrete(expr, rng=f"{int(minutes)}m", job=job), "start": start, "end": end, "step": step}, timeout=30)
            for series in r.json()["data"]["result"]:
                xs = [float(t) - end for t, _ in series["values"]]
                ys = [float(v) if v not in ("NaN", "+Inf", "-Inf") else float("nan") for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(fmt, series["metric"])[:40])
        ax.set_title(title, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("seconds before now", fontsize=7)
        if ax.lines:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle("alit-serve dashboard panels, rendered from Prometheus", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prometheus", default="http://127.0.0.1:9090")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--out", default="docs/dashboard.png")
    p.add_argument("--job", default=".*", help="the dashboard's job variable (a regex; default: all jobs)")
    a = p.parse_args()
    render(a.prometheus, a.out, a.minutes, job=a.job)


if __name__ == "__main__":
    main()
