"""Eval tables written by hand for the tests of the gate and its report: the shapes `compute_deltas` reads."""

import pandas as pd


def results_table(values: dict) -> pd.DataFrame:
    """Aggregate rows: {(category, metric): value}."""
    return pd.DataFrame([{"category": c, "metric": m, "value": v} for (c, m), v in values.items()])


def items_table(per_item: dict) -> pd.DataFrame:
    """Per-item rows: {(category, metric): [values]} (item ids shared by both models)."""
    rows = []
    for (category, metric), values in per_item.items():
        rows += [{"category": category, "item_id": f"{category}-{i}", metric: v} for i, v in enumerate(values)]
    return pd.DataFrame(rows)
