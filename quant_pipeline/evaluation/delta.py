"""Quantized vs base, per slice and metric, against a tolerance policy: a verdict of PASS, FAIL or INCOMPLETE.

Deltas are per slice because quantization damage is uneven: one slice can collapse while the
average holds. Each delta carries a paired bootstrap 95% interval over the same items. A gated
slice that cannot show a regression is never a pass: too few items, no value (NaN), or a base that
is uninformative (already at the metric's worst value, or indistinguishable from chance) makes the
verdict INCOMPLETE unless the policy waives that slice x metric by name, with a reason.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pandas as pd

from quant_pipeline.evaluation.policy import CHANCE_METRICS, REFERENCE_VALUES, WORST_VALUE, Policy, chance_levels
from quant_pipeline.evaluation.statistics import paired_bootstrap_ci, wilson_interval

REGRESSION, WITHIN, NOT_MEASURABLE, UNINFORMATIVE, WAIVED, UNGATED = (
    "regression beyond tolerance",
    "within tolerance",
    "not measurable",
    "uninformative",
    "waived",
    "reported (no tolerance)",
)
INCOMPLETE_STATUSES = (NOT_MEASURABLE, UNINFORMATIVE)
PASS, FAIL, INCOMPLETE = "PASS", "FAIL", "INCOMPLETE"
Verdict = Literal["PASS", "FAIL", "INCOMPLETE"]


def paired_items(
    base_items: pd.DataFrame | None, quant_items: pd.DataFrame | None, category: str, metric: str
) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-item values of one metric for the same items on both models (the base's fixed for agreement)."""
    if quant_items is None or metric not in quant_items.columns:
        return None
    q = quant_items[(quant_items["category"] == category)].set_index("item_id")[metric].dropna()
    if metric in REFERENCE_VALUES:
        return np.full(len(q), REFERENCE_VALUES[metric]), q.to_numpy(dtype=float)
    if base_items is None or metric not in base_items.columns:
        return None
    b = base_items[(base_items["category"] == category)].set_index("item_id")[metric].dropna()
    common = b.index.intersection(q.index)
    return b.loc[common].to_numpy(dtype=float), q.loc[common].to_numpy(dtype=float)


def uninformative_reason(
    category: str, metric: str, base_value: float, base_per_item: np.ndarray | None, chance: dict[str, float]
) -> str:
    """Why the base's value on this slice cannot reveal a regression ("" when it can)."""
    if metric in REFERENCE_VALUES:
        return ""  # agreement with the base: the base is the reference, never uninformative
    worst = WORST_VALUE.get(metric)
    if worst is not None and abs(base_value - worst) < 1e-9:
        end = "floor" if worst == 0.0 else "ceiling"
        return f"base {base_value:.2f} is at the {end} of {metric}: a regression cannot show"
    if metric in CHANCE_METRICS and category in chance:
        n = len(base_per_item) if base_per_item is not None else 0
        low, high = wilson_interval(float(np.sum(base_per_item)), n) if n else (0.0, 1.0)
        if low <= chance[category]:
            return (
                f"base {base_value:.2f} (95% interval {low:.2f}-{high:.2f}, n={n}) is not above chance "
                f"{chance[category]:.2f}: no skill to lose"
            )
    return ""


def compute_deltas(
    base: pd.DataFrame,
    quantized: pd.DataFrame,
    policy: Policy,
    base_items: pd.DataFrame | None = None,
    quant_items: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (slice, metric): values, delta with paired 95% CI, tolerance, status and why."""
    b = base.drop_duplicates(["category", "metric"], keep="last").set_index(["category", "metric"])["value"]
    q = quantized.drop_duplicates(["category", "metric"], keep="last").set_index(["category", "metric"])["value"]
    keys = list(dict.fromkeys([*b.index, *[k for k in q.index if k[1] in REFERENCE_VALUES]]))
    chance = chance_levels()
    rows = []
    for category, metric in keys:
        base_value = REFERENCE_VALUES.get(metric, b.get((category, metric), float("nan")))
        quant_value = q.get((category, metric), float("nan"))
        delta = quant_value - base_value
        pairs = paired_items(base_items, quant_items, category, metric)
        n_items = len(pairs[0]) if pairs is not None else None
        ci_low, ci_high = (
            paired_bootstrap_ci(*pairs)[1:] if pairs is not None and n_items else (float("nan"), float("nan"))
        )
        row = {
            "category": category, "metric": metric, "base": base_value, "quantized": quant_value, "delta": delta,
            "rel_delta": delta / abs(base_value) if base_value else float("nan"), "ci_low": ci_low, "ci_high": ci_high,
            "n_items": n_items, "significant": bool(ci_low > 0 or ci_high < 0) if n_items else False,
            "degradation": float("nan"), "tolerance": float("nan"), "mode": "", "status": UNGATED, "reason": "",
            "measured_status": "", "passed": True,
        }  # fmt: skip
        tol = policy.tolerances.get(metric)
        if tol is not None:
            degradation = -delta if tol.direction == "higher_is_better" else delta
            rel = degradation / abs(base_value) if base_value else (float("inf") if degradation > 0 else 0.0)
            measured = degradation if tol.mode == "absolute" else rel
            min_items = tol.min_items if tol.min_items is not None else policy.min_items
            if not (math.isfinite(base_value) and not math.isnan(quant_value)):
                where = "the base" if not math.isfinite(base_value) else "the quantized model"
                status, reason = NOT_MEASURABLE, f"no value on {where}"
            elif n_items is not None and n_items < min_items:
                status, reason = NOT_MEASURABLE, f"{n_items} paired item(s), the policy needs {min_items}"
            elif why := uninformative_reason(category, metric, base_value, pairs[0] if pairs else None, chance):
                status, reason = UNINFORMATIVE, why
            else:
                status, reason = (WITHIN, "") if measured <= tol.for_category(category) else (REGRESSION, "")
            waiver = policy.waiver(category, metric)
            measured_status = status
            if waiver is not None:
                status, reason = WAIVED, f"waived: {waiver.reason} (measured: {measured_status})"
            row.update(
                degradation=measured, tolerance=tol.for_category(category), mode=tol.mode, status=status,
                reason=reason, measured_status=measured_status, passed=status in (WITHIN, WAIVED),
            )  # fmt: skip
        rows.append(row)
    return pd.DataFrame(rows)


def verdict(deltas: pd.DataFrame, policy: Policy) -> tuple[Verdict, list[str]]:
    """The report's verdict and its reasons: FAIL if any gated slice regressed beyond tolerance; else
    INCOMPLETE if any gated slice could not show a regression, a gated metric was never measured, or
    nothing was gated at all; else PASS. Waived slices count neither way (they are listed)."""
    gated = deltas[deltas["status"] != UNGATED] if len(deltas) else deltas
    failing = gated[gated["status"] == REGRESSION] if len(gated) else gated
    if len(failing):
        return FAIL, [f"{r.metric}/{r.category}: regression beyond tolerance" for r in failing.itertuples()]
    reasons = [
        f"{r.metric}/{r.category}: {r.status} ({r.reason})"
        for r in gated.itertuples()
        if r.status in INCOMPLETE_STATUSES
    ] if len(gated) else []  # fmt: skip
    measured = set(deltas["metric"]) if len(deltas) else set()
    reasons += [f"{m}: gated by the policy but never measured" for m in sorted(set(policy.tolerances) - measured)]
    if not len(gated) or not (gated["status"] == WITHIN).any():
        reasons.append("no gated slice was measured within tolerance: nothing shows the model was checked")
    return (INCOMPLETE, reasons) if reasons else (PASS, [])


def item_table(base_items: pd.DataFrame, quant_items: pd.DataFrame) -> pd.DataFrame:
    """Per item, side by side: prompt id, slice, base output, quantized output, scores."""
    drop = ["model", "output_ids", "probe_text"]
    b = base_items.drop(columns=drop, errors="ignore").set_index(["task", "category", "item_id"]).add_prefix("base_")
    q = (
        quant_items.drop(columns=drop, errors="ignore")
        .set_index(["task", "category", "item_id"])
        .add_prefix("quantized_")
    )
    return b.join(q, how="outer").reset_index().dropna(axis=1, how="all")
