"""The delta report as a person reads it: Markdown for Dagster, a self-contained HTML page with plots."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import pandas as pd

from quant_pipeline.evaluation.delta import NOT_MEASURABLE, REGRESSION, UNGATED, UNINFORMATIVE, WAIVED, WITHIN
from quant_pipeline.evaluation.policy import Policy


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def render_markdown(
    deltas: pd.DataFrame, policy: Policy, policy_hash: str, artifact_id: str, outcome: str, reasons: list[str]
) -> str:
    gated = deltas[deltas["status"] != UNGATED]
    counts = gated["status"].value_counts().to_dict()
    lines = [
        f"## Delta report — {artifact_id}: **{outcome}**",
        f"Policy `{policy.name}` (sha256 `{policy_hash[:16]}`): "
        + ", ".join(f"{counts.get(s, 0)} {s}" for s in (REGRESSION, WITHIN, NOT_MEASURABLE, UNINFORMATIVE, WAIVED))
        + ".",
        "",
        *([f"**Why not PASS** ({len(reasons)}):", "", *(f"- {r}" for r in reasons), ""] if reasons else []),
        "A slice that cannot show a regression is never a pass: fewer paired items than the policy's "
        f"`min_items` ({policy.min_items}), no value, or a base at the metric's worst value or not above chance "
        "(its 95% interval reaches chance) make it INCOMPLETE; only a waiver in the policy, with a reason, sets "
        "it aside.",
        "",
    ]
    for status in (REGRESSION, NOT_MEASURABLE, UNINFORMATIVE, WAIVED, WITHIN, UNGATED):
        part = deltas[deltas["status"] == status]
        if not len(part):
            continue
        lines += [
            f"### {status.capitalize()} ({len(part)})",
            "",
            "| slice | metric | n | base | quantized | delta [95% CI] | tolerance | why |",
            "|---|---|---:|---:|---:|---|---:|---|",
        ]
        for r in part.itertuples():
            n = int(r.n_items) if r.n_items == r.n_items and r.n_items else None  # NaN: no per-item values
            ci = f" [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]" if n else ""
            tol = f"{_fmt(r.tolerance)}{' rel' if r.mode == 'relative' else ''}" if r.mode else "–"
            lines.append(
                f"| {r.category} | {r.metric} | {n or '–'} | {_fmt(r.base)} | "
                f"{_fmt(r.quantized)} | {r.delta:+.4f}{ci}{' *' if r.significant else ''} | {tol} | {r.reason} |"
            )
        lines.append("")
    lines.append("`*` the 95% paired bootstrap interval excludes zero.")
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def render_html(
    deltas: pd.DataFrame, markdown: str, base_results: pd.DataFrame, quant_results: pd.DataFrame, sizes: dict
) -> str:
    """A self-contained HTML report: the tables, per-slice deltas with intervals, and cost vs quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_ci = deltas[deltas["n_items"].fillna(0) > 0]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(with_ci))))
    labels = [f"{r.metric} / {r.category}" for r in with_ci.itertuples()]
    colors = [
        "#c0392b" if s == REGRESSION else "#7f8c8d" if s in (NOT_MEASURABLE, UNINFORMATIVE, WAIVED) else "#27ae60"
        for s in with_ci["status"]
    ]
    y = np.arange(len(with_ci))
    ax.errorbar(
        with_ci["delta"],
        y,
        xerr=[with_ci["delta"] - with_ci["ci_low"], with_ci["ci_high"] - with_ci["delta"]],
        fmt="none",
        ecolor="#555",
    )
    ax.scatter(with_ci["delta"], y, c=colors, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("quantized − base (95% paired bootstrap CI)")
    deltas_png = _png(fig)
    plt.close(fig)

    def pick(results, metric, category):
        row = results[(results["metric"] == metric) & (results["category"] == category)]
        return float(row["value"].iloc[0]) if len(row) else float("nan")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, (x_label, xs) in zip(
        axes,
        (
            ("size on disk (MB)", (sizes["base_mb"], sizes["quantized_mb"])),
            (
                "latency p50 (s)",
                (pick(base_results, "latency_p50_s", "cost"), pick(quant_results, "latency_p50_s", "cost")),
            ),
        ),
        strict=True,
    ):
        accs = (
            base_results[base_results["metric"] == "acc"]["value"].mean(),
            quant_results[quant_results["metric"] == "acc"]["value"].mean(),
        )
        ax.scatter(xs, accs, c=["#2c3e50", "#e67e22"])
        for x, a, name in zip(xs, accs, ("base", "quantized"), strict=True):
            ax.annotate(name, (x, a), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_ylabel("mean MC accuracy")
    cost_png = _png(fig)
    plt.close(fig)
    table = deltas.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="–", classes="deltas")
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
        "table{border-collapse:collapse;font-size:12px}"
        "td,th{border:1px solid #ccc;padding:3px 6px}"
        "pre{white-space:pre-wrap;background:#f6f6f6;padding:1em}"
    )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Delta report</title>
<style>{style}</style></head>
<body><h1>Delta report</h1><pre>{html.escape(markdown)}</pre>
<h2>Per-slice deltas with 95% intervals</h2><img src="data:image/png;base64,{deltas_png}">
<h2>Cost vs quality</h2><img src="data:image/png;base64,{cost_png}">
<h2>All rows</h2>{table}</body></html>"""
