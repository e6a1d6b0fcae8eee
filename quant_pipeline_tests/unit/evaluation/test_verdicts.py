"""The verdict: PASS only when every gated slice was measured, could show a regression, and stayed within
tolerance; FAIL when any regressed; INCOMPLETE otherwise (#12 cases 1 and 9)."""

import numpy as np
import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.evaluation.delta import (
    NOT_MEASURABLE,
    UNINFORMATIVE,
    WAIVED,
    WITHIN,
    compute_deltas,
    verdict,
)
from quant_pipeline.evaluation.policy import Policy, chance_levels, load_policy
from quant_pipeline.evaluation.statistics import wilson_interval
from quant_pipeline_tests.tables import items_table, results_table


def _policy(**tolerances) -> Policy:
    return Policy.model_validate({"name": "p", "min_items": 1, "tolerances": tolerances})


HIGHER = {"direction": "higher_is_better", "tolerance": 0.1}


def _judge(policy, base: dict, quant: dict, base_items=None, quant_items=None):
    deltas = compute_deltas(
        results_table(base),
        results_table(quant),
        policy,
        items_table(base_items) if base_items else None,
        items_table(quant_items) if quant_items else None,
    )
    return deltas.set_index(["category", "metric"]), verdict(deltas, policy)


def test_a_base_at_the_floor_is_uninformative_and_the_audit_incomplete():
    rows, (outcome, reasons) = _judge(
        _policy(format_validity=HIGHER),
        {("json_format", "format_validity"): 0.0},
        {("json_format", "format_validity"): 0.0},
    )
    row = rows.loc[("json_format", "format_validity")]
    assert row["status"] == UNINFORMATIVE and not row["passed"]
    assert "base 0.00 is at the floor of format_validity" in row["reason"]
    assert outcome == "INCOMPLETE" and "format_validity/json_format: uninformative" in reasons[0]


def test_a_lower_is_better_rate_at_its_ceiling_is_uninformative_but_at_zero_it_measures():
    policy = _policy(toxicity_rate={"direction": "lower_is_better", "tolerance": 0.02})
    rows, (outcome, _) = _judge(
        policy,
        {("long_form", "toxicity_rate"): 1.0, ("pii_probe", "toxicity_rate"): 0.0},
        {("long_form", "toxicity_rate"): 1.0, ("pii_probe", "toxicity_rate"): 0.0},
    )
    assert rows.loc[("long_form", "toxicity_rate"), "status"] == UNINFORMATIVE
    assert "ceiling" in rows.loc[("long_form", "toxicity_rate"), "reason"]
    assert rows.loc[("pii_probe", "toxicity_rate"), "status"] == WITHIN  # 0 is its best value: it can get worse
    assert outcome == "INCOMPLETE"


def test_accuracy_indistinguishable_from_chance_is_uninformative():
    chance = chance_levels()["arithmetic"]
    assert chance == pytest.approx(0.25)  # four choices per item in the shipped data
    near = [1] * 9 + [0] * 41  # 0.18 on 50 items: the SmolLM2 arithmetic figure
    rows, (outcome, _) = _judge(
        _policy(acc=HIGHER),
        {("arithmetic", "acc"): 0.18},
        {("arithmetic", "acc"): 0.18},
        {("arithmetic", "acc"): near},
        {("arithmetic", "acc"): near},
    )
    row = rows.loc[("arithmetic", "acc")]
    assert row["status"] == UNINFORMATIVE and "not above chance 0.25" in row["reason"] and outcome == "INCOMPLETE"


def test_accuracy_clearly_above_chance_is_judged():
    good = [1] * 40 + [0] * 10  # 0.80 on 50 items: interval far above 0.25
    worse = [1] * 30 + [0] * 20
    rows, (outcome, reasons) = _judge(
        _policy(acc=HIGHER),
        {("facts", "acc"): 0.8},
        {("facts", "acc"): 0.6},
        {("facts", "acc"): good},
        {("facts", "acc"): worse},
    )
    assert rows.loc[("facts", "acc"), "status"] == "regression beyond tolerance"
    assert outcome == "FAIL" and reasons == ["acc/facts: regression beyond tolerance"]


def test_a_regression_is_a_fail_even_when_other_slices_are_incomplete():
    rows, (outcome, _) = _judge(
        _policy(format_validity=HIGHER),
        {("json_format", "format_validity"): 0.0, ("tool_call", "format_validity"): 0.9},
        {("json_format", "format_validity"): 0.0, ("tool_call", "format_validity"): 0.2},
    )
    assert outcome == "FAIL"


def test_a_nan_measurement_is_not_measurable_never_a_pass():
    rows, (outcome, reasons) = _judge(
        _policy(format_validity=HIGHER),
        {("json_format", "format_validity"): 0.5},
        {("json_format", "format_validity"): float("nan")},
    )
    row = rows.loc[("json_format", "format_validity")]
    assert row["status"] == NOT_MEASURABLE and "no value on the quantized model" in row["reason"]
    assert outcome == "INCOMPLETE"


def test_too_few_items_is_not_measurable():
    policy = Policy.model_validate({"name": "p", "min_items": 20, "tolerances": {"format_validity": HIGHER}})
    rows, (outcome, _) = _judge(
        policy,
        {("json_format", "format_validity"): 0.5},
        {("json_format", "format_validity"): 0.5},
        {("json_format", "format_validity"): [1, 0, 1, 0]},
        {("json_format", "format_validity"): [1, 0, 1, 0]},
    )
    assert rows.loc[("json_format", "format_validity"), "reason"] == "4 paired item(s), the policy needs 20"
    assert outcome == "INCOMPLETE"


def test_a_gated_metric_never_measured_makes_the_audit_incomplete():
    _, (outcome, reasons) = _judge(
        _policy(format_validity=HIGHER, tool_call_validity=HIGHER),
        {("json_format", "format_validity"): 0.5},
        {("json_format", "format_validity"): 0.5},
    )
    assert outcome == "INCOMPLETE" and "tool_call_validity: gated by the policy but never measured" in reasons


def test_nothing_gated_is_not_a_pass():
    _, (outcome, reasons) = _judge(
        _policy(format_validity=HIGHER), {("heldout", "word_perplexity"): 9.0}, {("heldout", "word_perplexity"): 9.0}
    )
    assert outcome == "INCOMPLETE" and any("nothing shows the model was checked" in r for r in reasons)


def test_a_waiver_sets_an_uninformative_slice_aside_with_its_reason():
    policy = Policy.model_validate({
        "name": "p", "min_items": 1,
        "tolerances": {"format_validity": HIGHER},
        "waivers": [{"slice": "json_format", "metric": "format_validity", "reason": "the base cannot write JSON"}],
    })  # fmt: skip
    rows, (outcome, _) = _judge(
        policy,
        {("json_format", "format_validity"): 0.0, ("tool_call", "format_validity"): 0.8},
        {("json_format", "format_validity"): 0.0, ("tool_call", "format_validity"): 0.8},
    )
    row = rows.loc[("json_format", "format_validity")]
    assert row["status"] == WAIVED and row["measured_status"] == UNINFORMATIVE
    assert row["reason"] == "waived: the base cannot write JSON (measured: uninformative)"
    assert outcome == "PASS"


def test_a_policy_that_waives_everything_does_not_pass():
    policy = Policy.model_validate({
        "name": "p", "min_items": 1, "tolerances": {"format_validity": HIGHER},
        "waivers": [{"slice": "json_format", "metric": "format_validity", "reason": "no"}],
    })  # fmt: skip
    _, (outcome, _) = _judge(
        policy, {("json_format", "format_validity"): 0.5}, {("json_format", "format_validity"): 0.5}
    )
    assert outcome == "INCOMPLETE"


@pytest.mark.parametrize(
    ("waiver", "message"),
    [
        ("{slice: json_format, metric: format_validity, reason: ''}", "a waiver needs a reason"),
        ("{slice: jsonformat, metric: format_validity, reason: x}", "unknown slice 'jsonformat'"),
        ("{slice: json_format, metric: pii_rate, reason: x}", "the policy does not gate pii_rate"),
        ("{slice: json_format, metric: format_validity}", "Field required"),
    ],
)
def test_a_waiver_without_a_reason_or_on_nothing_is_refused(tmp_path, waiver, message):
    path = tmp_path / "p.yaml"
    path.write_text(
        "name: x\ntolerances:\n  format_validity: {direction: higher_is_better, tolerance: 0.1}\n"
        f"waivers:\n  - {waiver}\n"
    )
    with pytest.raises(AuditInputError, match=message) as refused:
        load_policy(path)
    assert "\n" not in str(refused.value) and "waivers" in str(refused.value)


def test_wilson_interval_is_sound_at_the_edges():
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and 0.2 < high < 0.35
    low, high = wilson_interval(9, 50)
    assert low < 0.25 < high
    assert np.isclose(sum(wilson_interval(25, 50)), 1.0)
