"""Which candidate to ship: every candidate's cost and worst per-slice regression side by side, the Pareto
frontiers, and a recommendation among those that PASS.

Regressions on different metrics are put on one scale the policy already defines: the share of its
tolerance a slice used (degradation / tolerance; 1.0 is the bar). A candidate's worst regression is its
largest share over every gated slice that measured, with the interval of that delta on the same scale. A
candidate whose evidence cannot be read back (report or tables changed since the gate judged them) is
listed as UNVERIFIED and is never recommended: missing evidence is not a pass. A candidate last judged under
another policy than the one governing the model now, or against another base evaluation (an older suite or
runtime), is listed as STALE and never recommended either: its verdict answers a question nobody asks any
more, until it is re-audited. Identity (the base, copied)
is listed, as the pipeline's own check, but never recommended: it saves nothing.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Literal

import pandas as pd
from pydantic import BaseModel

from quant_pipeline.evaluation.plots import linear, svg_document, svg_line, svg_number, svg_text, x_axis, y_axis

OBJECTIVES = {  # what "best" means among the candidates that PASS (smallest value wins)
    "size": "size_bytes",
    "latency": "latency_p50_s",
    "regression": "worst_share",
}
GATED = ("within tolerance", "regression beyond tolerance")


class TradeoffRow(BaseModel):
    """One candidate as the tradeoff table shows it."""

    candidate: str
    artifact_id: str
    method: str
    precision: str
    verdict: Literal["PASS", "FAIL", "INCOMPLETE", "UNVERIFIED", "STALE"]
    reason: str = ""
    size_bytes: int
    size_vs_base: float
    peak_rss_mb: float
    latency_p50_s: float
    latency_p95_s: float
    tokens_per_second: float
    worst_slice: str = ""
    worst_share: float = math.nan  # degradation / tolerance of the worst gated slice (1.0 = at the bar)
    worst_share_low: float = math.nan
    worst_share_high: float = math.nan
    kept: str = ""  # layer types kept at full precision (a `keep` recipe), and why (their sensitivity rank)
    why_kept: str = ""


def worst_regression(deltas: pd.DataFrame, higher_is_better: set[str]) -> dict:
    """The gated slice that used the largest share of its tolerance, with that share's 95% interval (the
    delta's interval put through the same map: sign by the metric's direction, relative to the base's value
    in relative mode, over the tolerance)."""
    gated = deltas[deltas["measured_status"].isin(GATED)] if "measured_status" in deltas else deltas.iloc[0:0]
    if gated.empty:
        return {}
    # a tolerance of 0 allows no degradation at all: any is infinitely over the bar
    tolerance = gated["tolerance"].where(gated["tolerance"] > 0, float("nan"))
    shares = (gated["degradation"] / tolerance).fillna(gated["degradation"].gt(0).map({True: math.inf, False: 0.0}))
    row = gated.loc[shares.idxmax()]
    sign = -1.0 if row["metric"] in higher_is_better else 1.0
    scale = abs(row["base"]) if row["mode"] == "relative" and row["base"] else 1.0
    over = row["tolerance"] if row["tolerance"] > 0 else math.nan  # no finite interval over a zero tolerance
    ends = sorted(sign * v / scale / over + 0.0 for v in (row["ci_low"], row["ci_high"]))  # + 0.0: no "-0.00"
    return {
        "worst_slice": f"{row['metric']}/{row['category']}",
        "worst_share": float(shares.max()),
        "worst_share_low": float(ends[0]),
        "worst_share_high": float(ends[1]),
    }


def pareto_front(rows: list[TradeoffRow], cost: str) -> list[str]:
    """Candidates no other candidate beats on both `cost` and worst regression (smaller is better on both)."""
    measured = [r for r in rows if not math.isnan(r.worst_share)]
    front = []
    for r in measured:
        a = (getattr(r, cost), r.worst_share)
        if not any(
            (getattr(o, cost), o.worst_share) != a and getattr(o, cost) <= a[0] and o.worst_share <= a[1]
            for o in measured
        ):
            front.append(r.candidate)
    return front


def recommend(
    rows: list[TradeoffRow], objective: str = "size", base_latency_p50_s: float | None = None
) -> tuple[TradeoffRow | None, str]:
    """The candidate that best meets the objective among those that PASS (identity excluded), and why: with what
    it costs against the base (its size, and its p50 latency against the base's measured one where known)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r}: use one of {', '.join(OBJECTIVES)}")
    field = OBJECTIVES[objective]
    passing = [r for r in rows if r.verdict == "PASS" and r.method != "identity"]
    if not passing:
        return None, "no quantized candidate passes the gate: none can be recommended"
    best = min(passing, key=lambda r: (getattr(r, field), r.worst_share, r.candidate))
    latency = f"p50 latency {best.latency_p50_s:.3f} s"
    if base_latency_p50_s and not math.isnan(base_latency_p50_s) and not math.isnan(best.latency_p50_s):
        latency += f" against the base's {base_latency_p50_s:.3f} s ({best.latency_p50_s / base_latency_p50_s:.2f}x)"
    return best, (
        f"{best.candidate} ({best.artifact_id}): the {objective} objective's best of {len(passing)} passing "
        f"candidate(s); {best.size_vs_base:.3f}x the base's size, {latency}; "
        "pending sign-off (nothing is approved automatically)"
    )


def _fmt(value: float, spec: str) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def markdown_table(rows: list[TradeoffRow], recommended: str | None) -> str:
    head = (
        "| candidate | verdict | size MiB | × base | peak RSS MB | p50 s | p95 s | tok/s | worst slice | "
        "share of tolerance [95% CI] |\n|---|---|---:|---:|---:|---:|---:|---:|---|---|\n"
    )
    lines = []
    for r in rows:
        mark = " **(recommended)**" if r.candidate == recommended else ""
        ci = f"{_fmt(r.worst_share, '.2f')} [{_fmt(r.worst_share_low, '.2f')}, {_fmt(r.worst_share_high, '.2f')}]"
        lines.append(
            f"| {r.candidate}{mark} | {r.verdict} | {r.size_bytes / 2**20:.1f} | {r.size_vs_base:.3f} | "
            f"{r.peak_rss_mb:.0f} | {_fmt(r.latency_p50_s, '.3f')} | {_fmt(r.latency_p95_s, '.3f')} | "
            f"{_fmt(r.tokens_per_second, '.1f')} | {r.worst_slice or '–'} | {ci if r.worst_slice else '–'} |"
        )
    notes = [f"- {r.candidate}: kept at full precision in every block: {r.why_kept}" for r in rows if r.kept]
    return head + "\n".join(lines) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def why_kept(keep: str, sensitivity: dict[str, float]) -> str:
    """The kept layer types with their rank and relative error among all the model's layer types."""
    ranked = sorted(sensitivity, key=lambda k: (-sensitivity[k], k))
    return ", ".join(
        f"{k} (most sensitive #{ranked.index(k) + 1} of {len(ranked)}, relative error {sensitivity[k]:.2e})"
        if k in sensitivity else f"{k} (not measured)"
        for k in keep.split(".")
    )  # fmt: skip


def plot_fronts(rows: list[TradeoffRow], path) -> list[str]:
    """Size and latency against the worst regression, one point per candidate, the frontier joined, both cost axes
    from zero, the bar (1.0) dashed; written to `path` as SVG (`evaluation.plots`' primitives: one way to draw,
    no matplotlib in an audit). Returns the candidates drawn (a candidate beyond a zero tolerance is drawn at the
    top, named); each is a `<g class="candidate" data-name=…>` with its values in a `<title>`."""
    measured = [r for r in rows if math.isfinite(r.worst_share)]
    beyond = [r for r in rows if r.worst_share == math.inf]  # over a zero tolerance: drawn at the top, named
    top_share = max([r.worst_share for r in measured] + [1.0]) * 1.15
    width, height, left, top, bottom = 470, 330, 70, 40, 270
    body = [svg_text(width + 20, 20, "Candidates: cost against worst per-slice regression (green PASS, red FAIL, "
                     "grey other)", 12, "middle")]  # fmt: skip
    low, high = -0.03 * top_share, 1.05 * top_share
    to_y = linear(low, high, bottom, top)
    for panel, (cost, label, scale) in enumerate(
        [("size_bytes", "size (MiB)", 2**20), ("latency_p50_s", "p50 latency (s)", 1.0)]
    ):
        shown = [r for r in measured + beyond if math.isfinite(getattr(r, cost))]
        right = max((getattr(r, cost) / scale for r in shown), default=1.0) * 1.15 or 1.0  # the axis from zero
        plot_left, plot_width = panel * (width + 40) + left, width - left - 20
        to_x = linear(0.0, right, plot_left, plot_left + plot_width)

        def point(r: TradeoffRow) -> tuple[float, float]:
            share = r.worst_share if r in measured else top_share
            return to_x(getattr(r, cost) / scale), to_y(share)  # noqa: B023 (called in this iteration)

        body += x_axis(0.0, right, plot_left, plot_width, top, bottom, label)
        body += y_axis(low, high, plot_left, top, bottom, "worst share of tolerance (1 = the bar)")
        bar = to_y(1.0)
        body.append(svg_line(plot_left, bar, plot_left + plot_width, bar, "#d62728", 0.8, "5 3"))
        front = set(pareto_front(rows, cost))
        joined = " ".join(
            f"{x:.1f},{y:.1f}" for x, y in sorted(point(r) for r in shown if r in measured and r.candidate in front)
        )
        body.append(f'<polyline class="front" points="{joined}" fill="none" stroke="black" stroke-width="1"/>')
        edge = plot_left + 0.6 * plot_width  # a name right of this is written leftwards, inside the panel
        for r in shown:
            x, y = point(r)
            colour = {"PASS": "#2ca02c", "FAIL": "#d62728"}.get(r.verdict, "#7f7f7f") if r in measured else "#d62728"
            mark = (
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{colour}"/>'
                if r in measured
                else f'<path d="M{x:.1f},{y - 6:.1f} l5,9 h-10 z" fill="{colour}"/>'
            )
            name = r.candidate if r in measured else f"{r.candidate} (beyond a zero tolerance)"
            said = f"{r.candidate}: {label} {svg_number(getattr(r, cost) / scale)}, worst share {r.worst_share:.3g}"
            body.append(
                f'<g class="candidate" data-name="{html.escape(r.candidate)}"><title>{html.escape(said)}</title>'
                f"{mark}{svg_text(x - 5, y - 5, name, 9, 'end') if x > edge else svg_text(x + 5, y - 5, name, 9)}</g>"
            )
    Path(path).write_text(svg_document(2 * width + 40, height, body, "cost against worst regression, per candidate"))
    return [r.candidate for r in measured + beyond]
