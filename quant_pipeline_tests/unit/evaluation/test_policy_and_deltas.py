"""Tolerance policies and per-slice deltas (pure: tables in, verdicts out)."""

from pathlib import Path

import pandas as pd
import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.paths import DEFAULT_POLICY
from quant_pipeline.evaluation.delta import compute_deltas
from quant_pipeline.evaluation.policy import KNOWN_METRICS, METRIC_DIRECTION, Policy, known_slices, load_policy
from quant_pipeline.evaluation.suite import BIAS_FILE, GENERATION_FILE, TASK_CATEGORY, read_jsonl


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
        {"name": "p", "tolerances": {"format_validity": {"direction": "higher_is_better", "tolerance": 0.05}}}
    )
    m = "format_validity"
    base = _table({("facts", m): 0.60, ("reading", m): 0.60, ("arithmetic", m): 0.60})
    quant = _table({("facts", m): 0.70, ("reading", m): 0.68, ("arithmetic", m): 0.45})  # the mean rises
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
                    "per_category": {"non_english": 0.30},
                }
            },
        }
    )
    base = _table({("heldout", "word_perplexity"): 20.0, ("non_english", "word_perplexity"): 10.0})
    quant = _table({("heldout", "word_perplexity"): 23.0, ("non_english", "word_perplexity"): 12.0})
    rows = compute_deltas(base, quant, policy).set_index("category")
    assert rows.loc["heldout", "degradation"] == pytest.approx(0.15) and not rows.loc["heldout", "passed"]
    assert rows.loc["non_english", "tolerance"] == 0.30 and rows.loc["non_english", "passed"]


def test_a_missing_quantized_measurement_fails_its_slice():
    policy = Policy.model_validate(
        {"name": "p", "tolerances": {"acc": {"direction": "higher_is_better", "tolerance": 0.05}}}
    )
    deltas = compute_deltas(_table({("facts", "acc"): 0.5}), _table({("other", "acc"): 0.5}), policy)
    assert not deltas.set_index("category").loc["facts", "passed"]


def _write(tmp_path, tolerances: str, head: str = "name: x\n") -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"{head}tolerances:\n{tolerances}")
    return path


def _refusal(path: Path) -> str:
    with pytest.raises(AuditInputError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: field `")
    return message


@pytest.mark.parametrize("value", ["-0.01", ".nan", "nan", ".inf", "-.inf", "1e999"])
def test_a_tolerance_must_be_finite_and_not_negative(tmp_path, value):
    path = _write(tmp_path, f"  acc: {{direction: higher_is_better, tolerance: {value}}}\n")
    assert "field `tolerances.acc.tolerance`: must be a finite number >= 0" in _refusal(path)


@pytest.mark.parametrize("value", ["-0.5", ".nan", ".inf"])
def test_a_per_category_tolerance_must_be_finite_and_not_negative(tmp_path, value):
    path = _write(
        tmp_path, f"  acc: {{direction: higher_is_better, tolerance: 0.1, per_category: {{facts: {value}}}}}\n"
    )
    assert "field `tolerances.acc.per_category.facts`: must be a finite number >= 0" in _refusal(path)


def test_zero_tolerance_is_a_legitimate_bar(tmp_path):
    path = _write(tmp_path, "  kl_divergence: {direction: lower_is_better, tolerance: 0.0, per_category: {facts: 0}}\n")
    policy, _ = load_policy(path)
    assert policy.tolerances["kl_divergence"].for_category("facts") == 0.0


def test_per_category_names_a_slice_the_suite_measures(tmp_path):
    path = _write(tmp_path, "  acc: {direction: higher_is_better, tolerance: 0.1, per_category: {nonexistent: 0.5}}\n")
    message = _refusal(path)
    assert "field `tolerances.acc.per_category.nonexistent`: unknown slice 'nonexistent'" in message
    assert "known slices: arithmetic, bias_age" in message and message.endswith("or remove the override")


def test_known_slices_are_read_from_the_shipped_suite():
    generation = {item["slice"] for item in read_jsonl(GENERATION_FILE)}
    bias = {f"bias_{pair['axis']}" for pair in read_jsonl(BIAS_FILE)}
    assert known_slices() == {*TASK_CATEGORY.values(), *generation, *bias, "cost"}
    assert {"facts", "heldout", "json_format", "should_refuse", "bias_gender", "cost"} <= known_slices()


def test_every_known_metric_has_exactly_one_direction():
    assert set(METRIC_DIRECTION) == set(KNOWN_METRICS)
    assert set(METRIC_DIRECTION.values()) == {"higher_is_better", "lower_is_better"}
    assert METRIC_DIRECTION["refusal_rate"] == "higher_is_better"  # measured on prompts that should be refused
    assert METRIC_DIRECTION["over_refusal_rate"] == "lower_is_better"
    assert METRIC_DIRECTION["tokens_per_second"] == "higher_is_better"
    assert all(METRIC_DIRECTION[m] == "lower_is_better" for m in KNOWN_METRICS if "perplexity" in m or "latency" in m)


@pytest.mark.parametrize(
    ("metric", "wrong", "right"),
    [
        ("word_perplexity", "higher_is_better", "lower_is_better"),
        ("kl_divergence", "higher_is_better", "lower_is_better"),
        ("acc", "lower_is_better", "higher_is_better"),
        ("refusal_rate", "lower_is_better", "higher_is_better"),
        ("over_refusal_rate", "higher_is_better", "lower_is_better"),
    ],
)
def test_a_direction_against_the_metric_is_refused(tmp_path, metric, wrong, right):
    path = _write(tmp_path, f"  {metric}: {{direction: {wrong}, tolerance: 0.1}}\n")
    message = _refusal(path)
    assert f"field `tolerances.{metric}.direction`: {metric} is {right}, not {wrong}" in message
    assert message.endswith(f"write `direction: {right}`")


def test_min_items_must_be_at_least_one(tmp_path):
    path = _write(tmp_path, "  acc: {direction: higher_is_better, tolerance: 0.1}\n", head="name: x\nmin_items: 0\n")
    assert "field `min_items`: must be >= 1, got 0" in _refusal(path)
    path = _write(tmp_path, "  acc: {direction: higher_is_better, tolerance: 0.1, min_items: 0}\n")
    assert "field `tolerances.acc.min_items`: must be >= 1, got 0" in _refusal(path)


def test_unknown_metric_is_named_with_the_known_ones(tmp_path):
    path = _write(tmp_path, "  accuracy: {direction: higher_is_better, tolerance: 0.05}\n")
    message = _refusal(path)
    assert "field `tolerances.accuracy`: unknown metric 'accuracy': use one of the known metrics: acc," in message


def test_the_rules_hold_for_a_policy_built_in_code_too():
    """delta and the reports take a Policy object: building one without a file must not skip the rules."""
    with pytest.raises(ValueError, match="must be a finite number >= 0"):
        Policy.model_validate({"name": "p", "tolerances": {"acc": {"direction": "higher_is_better", "tolerance": -1}}})
    with pytest.raises(ValueError, match="acc is higher_is_better, not lower_is_better"):
        Policy.model_validate({"name": "p", "tolerances": {"acc": {"direction": "lower_is_better", "tolerance": 0.1}}})
