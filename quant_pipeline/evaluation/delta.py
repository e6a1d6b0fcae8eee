"""Quantized vs base, per slice and metric, against a tolerance policy.

Deltas are per slice because quantization damage is uneven: one slice can collapse while the
average holds. Each delta carries a paired bootstrap 95% interval over the same items, and a slice
with too few items is reported as not measurable rather than silently passed or failed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from quant_pipeline.evaluation.policy import REFERENCE_VALUES, Policy
from quant_pipeline.evaluation.statistics import paired_bootstrap_ci

REGRESSION, WITHIN, NOT_MEASURABLE, UNGATED = (
    "regression beyond tolerance",
    "within tolerance",
    "not measurable (too few items)",
    "reported (no tolerance)",
)


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


def compute_deltas(
    base: pd.DataFrame,
    quantized: pd.DataFrame,
    policy: Policy,
    base_items: pd.DataFrame | None = None,
    quant_items: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """One row per (slice, metric): values, delta with paired 95% CI, tolerance and status."""
    b = base.drop_duplicates(["category", "metric"], keep="last").set_index(["category", "metric"])["value"]
    q = quantized.drop_duplicates(["category", "metric"], keep="last").set_index(["category", "metric"])["value"]
    keys = list(dict.fromkeys([*b.index, *[k for k in q.index if k[1] in REFERENCE_VALUES]]))
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
            "degradation": float("nan"), "tolerance": float("nan"), "mode": "", "status": UNGATED, "passed": True,
        }  # fmt: skip
        tol = policy.tolerances.get(metric)
        if tol is not None:
            degradation = -delta if tol.direction == "higher_is_better" else delta
            rel = degradation / abs(base_value) if base_value else (float("inf") if degradation > 0 else 0.0)
            measured = degradation if tol.mode == "absolute" else rel
            min_items = tol.min_items if tol.min_items is not None else policy.min_items
            if n_items is not None and n_items < min_items:
                status = NOT_MEASURABLE
            else:
                status = WITHIN if measured <= tol.for_category(category) else REGRESSION  # NaN: regression
            row.update(
                degradation=measured,
                tolerance=tol.for_category(category),
                mode=tol.mode,
                status=status,
                passed=status != REGRESSION,
            )
        rows.append(row)
    return pd.DataFrame(rows)


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
