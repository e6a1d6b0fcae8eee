"""Red team: ways to write a policy that looks like a bar but is not one (issue #12, point 4).

Each test writes one policy that tries to get around the rules (a bar below zero that fails even a
perfect copy, a NaN or infinite bar that no comparison can fail or pass honestly, an override for a
slice the suite never measures, a direction that turns a regression into an improvement, a minimum
of zero items) and pins the refusal: one line, naming the file, the field and the fix.
"""

from pathlib import Path

import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.evaluation.policy import load_policy

FINITE_FIX = "write the degradation allowed (0 allows none)"
SLICES = (
    "arithmetic, bias_age, bias_ethnicity, bias_gender, bias_nationality, bias_religion, cost, facts, heldout, "
    "json_format, long_form, non_english, pii_probe, reading, should_not_refuse, should_refuse, tool_call"
)


def refusal(tmp_path: Path, text: str) -> str:
    """Load `text` as a policy file; it must be refused with exactly one line, which is returned."""
    path = tmp_path / "attack.yaml"
    path.write_text(text)
    with pytest.raises(AuditInputError) as caught:
        load_policy(path)
    message = str(caught.value)
    assert "\n" not in message
    prefix = f"{path}: "
    assert message.startswith(prefix)
    return message[len(prefix) :]


def test_negative_tolerance_to_fail_every_slice(tmp_path):
    policy = "name: x\ntolerances:\n  acc: {direction: higher_is_better, tolerance: -0.5}\n"
    assert refusal(tmp_path, policy) == (
        f"field `tolerances.acc.tolerance`: must be a finite number >= 0, got -0.5: {FINITE_FIX}"
    )


@pytest.mark.parametrize("spelling", [".nan", ".NaN", "nan", "'NaN'"])
def test_nan_tolerance_in_any_spelling(tmp_path, spelling):
    policy = f"name: x\ntolerances:\n  acc: {{direction: higher_is_better, tolerance: {spelling}}}\n"
    assert refusal(tmp_path, policy) == (
        f"field `tolerances.acc.tolerance`: must be a finite number >= 0, got nan: {FINITE_FIX}"
    )


@pytest.mark.parametrize("spelling", [".inf", "1e999", "'Infinity'"])
def test_infinite_tolerance_to_pass_everything(tmp_path, spelling):
    policy = f"name: x\ntolerances:\n  kl_divergence: {{direction: lower_is_better, tolerance: {spelling}}}\n"
    assert refusal(tmp_path, policy) == (
        f"field `tolerances.kl_divergence.tolerance`: must be a finite number >= 0, got inf: {FINITE_FIX}"
    )


def test_nan_hidden_in_a_per_category_override(tmp_path):
    policy = (
        "name: x\ntolerances:\n  acc: {direction: higher_is_better, tolerance: 0.05, per_category: {facts: .nan}}\n"
    )
    assert refusal(tmp_path, policy) == (
        f"field `tolerances.acc.per_category.facts`: must be a finite number >= 0, got nan: {FINITE_FIX}"
    )


def test_negative_per_category_override(tmp_path):
    policy = (
        "name: x\ntolerances:\n  acc: {direction: higher_is_better, tolerance: 0.05, per_category: {reading: -1}}\n"
    )
    assert refusal(tmp_path, policy) == (
        f"field `tolerances.acc.per_category.reading`: must be a finite number >= 0, got -1.0: {FINITE_FIX}"
    )


@pytest.mark.parametrize("name", ["nonexistent", "Facts", "bias_colour", "overall"])
def test_per_category_on_a_slice_that_does_not_exist(tmp_path, name):
    """Used to be silently ignored: the reader believes a slice has its own bar, the gate never applies it."""
    override = f"per_category: {{{name}: 0.5}}"
    policy = f"name: x\ntolerances:\n  acc: {{direction: higher_is_better, tolerance: 0.05, {override}}}\n"
    assert refusal(tmp_path, policy) == (
        f"field `tolerances.acc.per_category.{name}`: unknown slice '{name}' (the suite never measures it, "
        f"so the override would never apply); known slices: {SLICES}: name one of them or remove the override"
    )


@pytest.mark.parametrize(
    ("metric", "wrong", "right"),
    [
        ("word_perplexity", "higher_is_better", "lower_is_better"),  # perplexity doubling would pass
        ("acc", "lower_is_better", "higher_is_better"),  # accuracy collapsing would pass
        ("refusal_rate", "lower_is_better", "higher_is_better"),  # no longer refusing harmful prompts would pass
        ("toxicity_rate", "higher_is_better", "lower_is_better"),
    ],
)
def test_direction_that_turns_a_regression_into_an_improvement(tmp_path, metric, wrong, right):
    policy = f"name: x\ntolerances:\n  {metric}: {{direction: {wrong}, tolerance: 0.1}}\n"
    assert refusal(tmp_path, policy) == (
        f"field `tolerances.{metric}.direction`: {metric} is {right}, not {wrong}: write `direction: {right}`"
    )


def test_policy_min_items_zero_judges_slices_on_nothing(tmp_path):
    policy = "name: x\nmin_items: 0\ntolerances:\n  acc: {direction: higher_is_better, tolerance: 0.05}\n"
    assert refusal(tmp_path, policy) == (
        "field `min_items`: must be >= 1, got 0: give at least 1 (a slice with fewer paired items is reported "
        "not measurable, so 0 would judge a slice on no items at all)"
    )


def test_per_metric_min_items_zero_or_negative(tmp_path):
    policy = "name: x\ntolerances:\n  bias_gap: {direction: lower_is_better, tolerance: 0.5, min_items: -3}\n"
    assert refusal(tmp_path, policy) == (
        "field `tolerances.bias_gap.min_items`: must be >= 1, got -3: give at least 1 (a slice with fewer paired "
        "items is reported not measurable, so 0 would judge a slice on no items at all)"
    )
