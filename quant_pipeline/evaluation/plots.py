"""Plots of an audit that do not mislead: each metric on its own scale, the bar drawn, nothing failing dropped.

One x-axis for eighty metric x slice rows of incomparable scales hides the rows that matter, so the deltas
are small multiples: one panel per metric, its slices as rows, the tolerance as a dashed mark per row
(relative tolerances are a different distance on every slice, since they scale with the base). A row
without per-item values (a perplexity, bits per byte) has no interval but is still drawn as a point:
leaving it out would leave out a failing slice. Cost axes start at zero: a size or a latency read off a
truncated axis looks like a factor it is not. Every function returns base64 PNG text for inline <img>.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
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
# Shares of a whole, shown in percentage points so the table and the plots speak the same unit.
RATE_METRICS = frozenset({
    "acc", "acc_norm", "top1_agreement", "exact_match", "prefix_agreement", "format_validity",
    "tool_call_validity", "refusal_rate", "over_refusal_rate", "toxicity_rate", "pii_rate", "repetition_rate",
    "degeneration_rate",
})  # fmt: skip


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    _pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def tolerance_offset(metric: str, tolerance: float, mode: str, base: float) -> float:
    """Where the bar lies as a delta (quantized − base): below zero for a higher-is-better metric, above for a
    lower-is-better one; a relative tolerance is a fraction of the base, so its offset scales with it.
    NaN when the row has no tolerance (ungated) or the bar cannot be placed (relative to a missing base)."""
    if mode not in ("absolute", "relative") or tolerance is None or not math.isfinite(tolerance):
        return math.nan
    allowed = tolerance * abs(base) if mode == "relative" else tolerance
    return -allowed if METRIC_DIRECTION.get(metric) == HIGHER else allowed


def delta_panels(rows: pd.DataFrame) -> list[tuple[str, str]]:
    """One (metric, base64 PNG) per metric: its slices' deltas with 95% intervals where there are any, the
    tolerance as a dashed mark per slice, points coloured by status with a legend.

    ``rows`` needs category, metric, base, delta, ci_low, ci_high, tolerance, mode and status columns."""
    plt = _pyplot()
    from matplotlib.lines import Line2D

    panels = []
    for metric, part in rows.groupby("metric", sort=True):
        part = part.sort_values("category", ascending=False)
        scale = 100.0 if metric in RATE_METRICS else 1.0
        y = np.arange(len(part))
        fig, ax = plt.subplots(figsize=(6.5, 1.0 + 0.32 * len(part)))
        for yi, r in zip(y, part.itertuples(), strict=True):
            colour = STATUS_COLOURS.get(r.status, "#333")
            has_ci = math.isfinite(r.ci_low) and math.isfinite(r.ci_high)
            if has_ci:
                ax.plot([r.ci_low * scale, r.ci_high * scale], [yi, yi], color=colour, lw=1.5)
            if math.isfinite(r.delta):
                ax.scatter(r.delta * scale, yi, color=colour if has_ci else "white", edgecolor=colour, zorder=3, s=30)
            bar = tolerance_offset(metric, r.tolerance, r.mode, r.base)
            if math.isfinite(bar):
                ax.plot([bar * scale] * 2, [yi - 0.4, yi + 0.4], color="black", ls="--", lw=1)
        ax.axvline(0, color="#555", lw=0.6)
        ax.set_yticks(y, list(part["category"]), fontsize=8)
        ax.set_ylim(-0.6, len(part) - 0.4)
        unit = " (percentage points)" if scale == 100.0 else ""
        ax.set_xlabel(f"{metric}: quantized − base{unit}", fontsize=9)
        present = [s for s in STATUS_COLOURS if s in set(part["status"])]
        handles = [Line2D([], [], marker="o", ls="", color=STATUS_COLOURS[s], label=s) for s in present]
        with_ci = part["ci_low"].notna() & part["ci_high"].notna()
        handles += [
            *([Line2D([], [], color="black", ls="--", label="tolerance (the bar)")] if part["mode"].any() else []),
            *([Line2D([], [], color="#555", lw=1.5, label="95% paired bootstrap interval")] if with_ci.any() else []),
            *(
                [Line2D([], [], marker="o", ls="", markerfacecolor="white", color="#555", label="no per-item interval")]
                if not with_ci.all()
                else []
            ),
        ]
        ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        panels.append((str(metric), _png(fig)))
    return panels


def cost_quality(points: list[CostPoint], quality_label: str = "mean multiple-choice accuracy") -> str:
    """Size and p50 latency against quality, one point per model; both cost axes start at zero and the
    quality axis spans 0–100% (an accuracy read off a truncated axis exaggerates every difference)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), layout="constrained")
    for ax, (field, label) in zip(
        axes, (("size_mb", "size on disk (MB)"), ("latency_s", "p50 latency (s)")), strict=True
    ):
        shown = [p for p in points if math.isfinite(getattr(p, field)) and math.isfinite(p.quality)]
        for i, p in enumerate(shown):
            ax.scatter(getattr(p, field), p.quality * 100, color=f"C{i % 10}", zorder=3, label=p.name)
            ax.annotate(p.name, (getattr(p, field), p.quality * 100), textcoords="offset points", xytext=(4, 4),
                        fontsize=8)  # fmt: skip
        top = max((getattr(p, field) for p in shown), default=1.0)
        ax.set_xlim(0, top * 1.25 or 1.0)
        ax.set_ylim(0, 100)
        ax.set_xlabel(label)
        ax.set_ylabel(f"{quality_label} (%)")
        missing = [p.name for p in points if p not in shown]
        if missing:
            ax.set_title(f"not measured: {', '.join(missing)}", fontsize=8)
    return _png(fig)
