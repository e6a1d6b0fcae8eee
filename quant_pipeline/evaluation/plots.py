"""Plots of an audit that do not mislead: each metric on its own scale, the bar drawn, nothing failing dropped.

One x-axis for eighty metric x slice rows of incomparable scales hides the rows that matter, so the deltas
are small multiples: one panel per metric, its slices as rows, the tolerance as a dashed mark per row
(relative tolerances are a different distance on every slice, since they scale with the base). A row
without per-item values (a perplexity, bits per byte) has no interval but is still drawn as a point:
leaving it out would leave out a failing slice. Cost axes start at zero: a size or a latency read off a
truncated axis looks like a factor it is not.

Every function returns SVG text, drawn here rather than by matplotlib: a report has about 25 panels, which took
matplotlib 2.6-2.7 s of every audit on one core (measured 2026-11-27) and this code 0.1 s. The SVG is also a
record a reviewer can read: each slice is a `<g class="row status-…" data-slice=…>` (the per-slice table's status
classes) with its values in a `<title>` (shown on hover), so what a panel draws can be checked, not only looked at.
"""

from __future__ import annotations

import base64
import html
import math

import pandas as pd

from quant_pipeline.evaluation.delta import NOT_MEASURABLE, REGRESSION, UNGATED, UNINFORMATIVE, WAIVED, WITHIN
from quant_pipeline.evaluation.policy import HIGHER, METRIC_DIRECTION
from quant_pipeline.evaluation.report_context import CostPoint

STATUS_COLOURS = {
    REGRESSION: "#c0392b",
    NOT_MEASURABLE: "#e67e22",
    UNINFORMATIVE: "#8e44ad",
    WAIVED: "#2980b9",
    WITHIN: "#27ae60",
    UNGATED: "#95a5a6",
}
# The class a row of a status carries, in the per-slice table and in the panels alike.
STATUS_CLASS = {
    REGRESSION: "status-regression", NOT_MEASURABLE: "status-not-measurable", UNINFORMATIVE: "status-uninformative",
    WAIVED: "status-waived", WITHIN: "status-within", UNGATED: "status-ungated",
}  # fmt: skip
# Shares of a whole, shown in percentage points so the table and the plots speak the same unit.
RATE_METRICS = frozenset({
    "acc", "acc_norm", "top1_agreement", "exact_match", "prefix_agreement", "format_validity",
    "tool_call_validity", "refusal_rate", "over_refusal_rate", "toxicity_rate", "pii_rate", "repetition_rate",
    "degeneration_rate",
})  # fmt: skip
POINT_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22")
FONT = 'font-family="DejaVu Sans, Arial, sans-serif"'
ROW, LEGEND_WIDTH, PLOT_WIDTH = 24, 200, 330


def tolerance_offset(metric: str, tolerance: float, mode: str, base: float) -> float:
    """Where the bar lies as a delta (quantized − base): below zero for a higher-is-better metric, above for a
    lower-is-better one; a relative tolerance is a fraction of the base, so its offset scales with it.
    NaN when the row has no tolerance (ungated) or the bar cannot be placed (relative to a missing base)."""
    if mode not in ("absolute", "relative") or tolerance is None or not math.isfinite(tolerance):
        return math.nan
    allowed = tolerance * abs(base) if mode == "relative" else tolerance
    return -allowed if METRIC_DIRECTION.get(metric) == HIGHER else allowed


def ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2 or 5 times a power of ten apart) spanning [low, high]."""
    span = high - low
    if not (math.isfinite(span) and span > 0):
        return [low]
    raw = span / max(count - 1, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(low / step - 1e-9)
    return [float(round(k * step, 12)) for k in range(first, math.floor(high / step + 1e-9) + 1)]


def svg_number(value: float) -> str:
    return f"{value:.4g}"


def svg_text(x: float, y: float, text: str, size: int = 11, anchor: str = "start", extra: str = "") -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" {FONT}{extra}>'
        f"{html.escape(text)}</text>"
    )


def svg_line(x1: float, y1: float, x2: float, y2: float, colour: str, width: float = 1, dash: str = "") -> str:
    dashes = f' stroke-dasharray="{dash}"' if dash else ""
    ends = f'x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}"'
    return f'<line {ends} stroke="{colour}" stroke-width="{width}"{dashes}/>'


def svg_document(width: float, height: float, body: list[str], label: str) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
        f'viewBox="0 0 {width:.0f} {height:.0f}" role="img" aria-label="{html.escape(label)}">'
        f'<rect width="100%" height="100%" fill="white"/>{"".join(body)}</svg>'
    )


def linear(low: float, high: float, start: float, end: float):
    """The map from values to pixels that puts `low` at `start` and `high` at `end`: an axis's ticks and all that is
    drawn against it go through the same one."""
    return lambda value: start + (value - low) / (high - low) * (end - start)


def x_axis(low: float, high: float, left: float, width: float, top: float, bottom: float, label: str) -> list[str]:
    """Tick marks, grid and values along the bottom, the axis label under them; the scale as (lo, hi) → pixels."""
    out, at = [svg_line(left, bottom, left + width, bottom, "#333")], linear(low, high, left, left + width)
    for t in ticks(low, high):
        x = at(t)
        out += [svg_line(x, top, x, bottom, "#eee"), svg_line(x, bottom, x, bottom + 4, "#333")]
        out.append(svg_text(x, bottom + 16, svg_number(t), 10, "middle"))
    out.append(svg_text(left + width / 2, bottom + 32, label, 11, "middle"))
    return out


def y_axis(low: float, high: float, left: float, top: float, bottom: float, label: str) -> list[str]:
    """The left axis: values from `low` at `bottom` to `high` at `top`, ticked, the label written upwards."""
    out, at = [svg_line(left, top, left, bottom, "#333")], linear(low, high, bottom, top)
    for t in ticks(low, high):
        y = at(t)
        out += [svg_line(left - 4, y, left, y, "#333"), svg_text(left - 7, y + 4, svg_number(t), 10, "end")]
    mid, x = (top + bottom) / 2, left - 42
    return [*out, svg_text(x, mid, label, 10, "middle", f' transform="rotate(-90 {x:.1f} {mid:.1f})"')]


def svg_data_uri(svg: str) -> str:
    """An SVG as an `<img>` source: the report stays one file, and an image runs no script whatever its text."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()


def _dot(colour: str, fill: str | None = None):
    return lambda x, y: f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4.5" fill="{fill or colour}" stroke="{colour}"/>'


def _legend(entries: list[tuple], x: float, y: float) -> list[str]:
    """Entries (mark, text) stacked from (x, y); a mark draws itself centred on the point it is given."""
    drawn = [
        mark(x + 5, y + 16 * i) + svg_text(x + 16, y + 16 * i + 4, text, 10) for i, (mark, text) in enumerate(entries)
    ]
    return [f'<g class="legend">{"".join(drawn)}</g>']


def delta_panel(metric: str, part: pd.DataFrame) -> str:
    """One metric's slices as rows: the delta as a point (filled when it has a 95% interval, drawn as a line),
    the tolerance as a dashed mark, zero as a solid line; each row's values in its `<title>`."""
    part = part.sort_values("category")
    scale = 100.0 if metric in RATE_METRICS else 1.0
    bars = [tolerance_offset(metric, r.tolerance, r.mode, r.base) * scale for r in part.itertuples()]
    values = [0.0, *bars, *(part[["delta", "ci_low", "ci_high"]].to_numpy().ravel() * scale)]
    finite = [v for v in values if math.isfinite(v)]
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.06 or max(abs(high), 1.0) * 0.1
    low, high = low - pad, high + pad
    left = 12 + 6.2 * max(len(str(c)) for c in part["category"])
    top, bottom = 8, 8 + ROW * len(part)
    x = linear(low, high, left, left + PLOT_WIDTH)
    unit = " (percentage points)" if scale == 100.0 else ""
    body = x_axis(low, high, left, PLOT_WIDTH, top, bottom, f"{metric}: quantized − base{unit}")
    body.append(svg_line(x(0), top, x(0), bottom, "#555", 0.8))
    for i, (r, bar) in enumerate(zip(part.itertuples(), bars, strict=True)):
        y = top + ROW * (i + 0.5)
        colour = STATUS_COLOURS.get(r.status, "#333")
        has_ci = math.isfinite(r.ci_low) and math.isfinite(r.ci_high)
        ci = f", 95% interval [{svg_number(r.ci_low * scale)}, {svg_number(r.ci_high * scale)}]" if has_ci else ""
        tolerance = f", bar at {svg_number(bar)}" if math.isfinite(bar) else ", no bar"
        said = f"{r.category}: delta {svg_number(r.delta * scale)}{ci}{tolerance}, {r.status}"
        row = [f"<title>{html.escape(said)}</title>"]
        row.append(svg_text(left - 6, y + 4, str(r.category), 11, "end"))
        if has_ci:
            row.append(svg_line(x(r.ci_low * scale), y, x(r.ci_high * scale), y, colour, 2))
        if math.isfinite(r.delta):
            fill = colour if has_ci else "white"
            row.append(f'<circle cx="{x(r.delta * scale):.1f}" cy="{y:.1f}" r="4.5" fill="{fill}" stroke="{colour}"/>')
        if math.isfinite(bar):
            row.append(svg_line(x(bar), y - ROW * 0.4, x(bar), y + ROW * 0.4, "black", 1, "4 3"))
        status = STATUS_CLASS.get(r.status, "status-other")
        body.append(f'<g class="row {status}" data-slice="{html.escape(str(r.category))}">{"".join(row)}</g>')
    entries = [(_dot(STATUS_COLOURS[s]), s) for s in STATUS_COLOURS if s in set(part["status"])]
    with_ci = part["ci_low"].notna() & part["ci_high"].notna()
    if part["mode"].astype(bool).any():
        entries.append((lambda x, y: svg_line(x, y - 7, x, y + 7, "black", 1, "4 3"), "tolerance (the bar)"))
    if with_ci.any():
        entries.append((lambda x, y: svg_line(x - 7, y, x + 7, y, "#555", 2), "95% paired bootstrap interval"))
    if not with_ci.all():
        entries.append((_dot("#555", "white"), "no per-item interval"))
    legend_x = left + PLOT_WIDTH + 16
    body += _legend(entries, legend_x, top + 8)
    height = max(bottom + 40, top + 16 * len(entries) + 16)
    return svg_document(legend_x + LEGEND_WIDTH, height, body, f"deltas of {metric} per slice")


def delta_panels(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """One (metric, SVG) per metric, in metric order.

    ``rows`` needs category, metric, base, delta, ci_low, ci_high, tolerance, mode and status columns."""
    return [(str(metric), delta_panel(str(metric), part)) for metric, part in rows.groupby("metric", sort=True)]


def cost_quality(points: list[CostPoint], quality_label: str = "mean multiple-choice accuracy") -> str:
    """Size and p50 latency against quality, one point per model; both cost axes start at zero and the
    quality axis spans 0–100% (an accuracy read off a truncated axis exaggerates every difference)."""
    width, height, left, top, bottom = 330, 250, 56, 26, 200
    body = []
    for panel, (field, label) in enumerate((("size_mb", "size on disk (MB)"), ("latency_s", "p50 latency (s)"))):
        offset = panel * (width + 40)
        shown = [p for p in points if math.isfinite(getattr(p, field)) and math.isfinite(p.quality)]
        top_value = max((getattr(p, field) for p in shown), default=1.0) * 1.25 or 1.0
        plot_left, plot_width = offset + left, width - left - 10
        body += x_axis(0.0, top_value, plot_left, plot_width, top, bottom, label)
        body += y_axis(0.0, 100.0, plot_left, top, bottom, f"{quality_label} (%)")
        to_x, to_y = linear(0.0, top_value, plot_left, plot_left + plot_width), linear(0.0, 1.0, bottom, top)
        for i, p in enumerate(shown):
            px, py = to_x(getattr(p, field)), to_y(p.quality)
            colour = POINT_COLOURS[i % len(POINT_COLOURS)]
            said = f"{p.name}: {label} {svg_number(getattr(p, field))}, quality {p.quality:.1%}"
            title = f"<title>{html.escape(said)}</title>"
            point = f'<circle cx="{px:.1f}" cy="{py:.1f}" r="4.5" fill="{colour}"/>'
            right = px > plot_left + plot_width * 0.6  # a name near the right edge is written leftwards
            name = svg_text(px - 6 if right else px + 6, py - 6, p.name, 10, "end" if right else "start")
            body.append(f'<g class="point" data-name="{html.escape(p.name)}">{title}{point}{name}</g>')
        missing = [p.name for p in points if p not in shown]
        if missing:
            body.append(svg_text(plot_left + plot_width / 2, 14, f"not measured: {', '.join(missing)}", 10, "middle"))
    return svg_document(2 * width + 40, height, body, "size and latency against accuracy")
