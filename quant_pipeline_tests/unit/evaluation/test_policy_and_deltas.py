"""Tolerance policies and per-slice deltas (pure: tables in, verdicts out)."""

import pandas as pd
import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.paths import DEFAULT_POLICY
from quant_pipeline.evaluation.delta import compute_deltas
from quant_pipeline.evaluation.policy import Policy, load_policy


def _table(values: dict) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"model": "m", "task": "t", "category": c, "metric": m, "value": v, "stderr": 0.0}
            for (c, m), v in values.items()
        ]
    )


def test_shipped_policy_is_valid_and_hashed():
    policy, digest = load_policy(DEFAULT_POLICY)
    assert "acc" in policy.tolerances and len(digest) == 64


def test_policy_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ntolerances:\n  acc: {direction: up, tolerance: 0.1}\n")
    with pytest.raises(AuditInputError, match=r"field `tolerances.acc.direction`"):
        load_policy(bad)
    bad.write_text("name: x\ntolerances: [\n")
    with pytest.raises(AuditInputError, match=r"p.yaml:\d+: not valid YAML"):
        load_policy(bad)


def test_one_failing_slice_fails_even_when_the_average_holds():
    policy = Policy.model_validate(
        {"name": "p", "tolerances": {"acc": {"direction": "higher_is_better", "tolerance": 0.05}}}
    )
    base = _table({("facts", "acc"): 0.60, ("reading", "acc"): 0.60, ("arithmetic", "acc"): 0.60})
    quant = _table({("facts", "acc"): 0.70, ("reading", "acc"): 0.68, ("arithmetic", "acc"): 0.45})  # mean rises
    deltas = compute_deltas(base, quant, policy)
    assert quant["value"].mean() > base["value"].mean()
    assert deltas.set_index("category")["passed"].to_dict() == {"facts": True, "reading": True, "arithmetic": False}


def test_relative_tolerance_and_lower_is_better_metrics():
    policy = Policy.model_validate(
        {
            "name": "p",
            "tolerances": {
                "word_perplexity": {
                    "direction": "lower_is_better",
                    "mode": "relative",
                    "tolerance": 0.10,
                    "per_category": {"code": 0.30},
                }
            },
        }
    )
    base = _table({("heldout", "word_perplexity"): 20.0, ("code", "word_perplexity"): 10.0})
    quant = _table({("heldout", "word_perplexity"): 23.0, ("code", "word_perplexity"): 12.0})
    rows = compute_deltas(base, quant, policy).set_index("category")
    assert rows.loc["heldout", "degradation"] == pytest.approx(0.15) and not rows.loc["heldout", "passed"]
    assert rows.loc["code", "tolerance"] == 0.30 and rows.loc["code", "passed"]


def test_a_missing_quantized_measurement_fails_its_slice():
    policy = Policy.model_validate(
        {"name": "p", "tolerances": {"acc": {"direction": "higher_is_better", "tolerance": 0.05}}}
    )
    deltas = compute_deltas(_table({("facts", "acc"): 0.5}), _table({("other", "acc"): 0.5}), policy)
    assert not deltas.set_index("category").loc["facts", "passed"]
