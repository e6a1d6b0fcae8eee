"""The canary rollback policy: trips only when an interval clears its threshold, never on thin evidence, and a
policy file that cannot be used is refused in one line naming the file and the field."""

import dagster as dg
import pytest

from quant_pipeline.core.paths import DEFAULT_ROLLBACK_POLICY
from quant_pipeline.defs.resources import MonitoringSettings, build_resources
from quant_pipeline.monitoring.requests import LoggedRequest
from quant_pipeline.monitoring.rollback import (
    RollbackPolicy,
    RollbackPolicyError,
    about_version,
    evaluate,
    load_rollback_policy,
    newcombe_difference,
)
from quant_pipeline.monitoring.signals import rate, window_signals
from quant_pipeline_tests.traffic import HOUR, WINDOW_START, arm_traffic

ONLY_VALIDATION = RollbackPolicy(name="validation", min_requests_per_arm=50, validation_failure_excess=0.05)


def decide(rows: list[dict], policy: RollbackPolicy = ONLY_VALIDATION):
    entries = [LoggedRequest.model_validate(r) for r in rows]
    return evaluate(window_signals("tiny", entries, WINDOW_START, WINDOW_START + HOUR), policy)


def test_newcombe_interval_matches_the_published_example():
    # Newcombe (1998), Statistics in Medicine 17:873, method 10: 56/70 - 48/80 -> 0.2000 [0.0524, 0.3339]
    d, low, high = newcombe_difference(rate(56, 70, ""), rate(48, 80, ""))
    assert (round(d, 4), round(low, 4), round(high, 4)) == (0.2, 0.0524, 0.3339)


def test_a_rate_excess_trips_only_when_its_interval_clears_the_threshold():
    # the same 12-point excess of invalid outputs, once on 50 declared requests per arm, once on 500
    thin = decide(
        arm_traffic("production", 50, version="1", declared=50)
        + arm_traffic("canary", 50, version="2", declared=50, invalid=6)
    )
    (criterion,) = thin.criteria
    assert thin.enough_evidence and not thin.trip and criterion.estimate == pytest.approx(0.12)
    assert criterion.low < 0.05 < criterion.estimate and "does not clear 0.05" in criterion.evidence
    thick = decide(
        arm_traffic("production", 500, version="1", declared=500)
        + arm_traffic("canary", 500, version="2", declared=500, invalid=60)
    )
    (criterion,) = thick.criteria
    assert thick.trip and criterion.tripped and criterion.low > 0.05 and criterion.method.startswith("Newcombe")
    assert thick.reasons == [criterion.evidence] and "60/500" in criterion.evidence and "0/500" in criterion.evidence
    assert thick.summary.startswith("roll back canary: validation_failure_rate")
    # a canary better than production never trips an excess
    better = decide(
        arm_traffic("production", 500, version="1", declared=500, invalid=60)
        + arm_traffic("canary", 500, version="2", declared=500)
    )
    assert not better.trip and better.criteria[0].high < 0


def test_too_few_requests_on_either_arm_is_not_enough_evidence_and_never_trips():
    decision = decide(
        arm_traffic("production", 400, version="1", declared=400)
        + arm_traffic("canary", 20, version="2", declared=20, invalid=20)  # every canary output broken
    )
    assert not decision.enough_evidence and not decision.trip and decision.criteria == []
    assert decision.summary.startswith("not enough evidence: canary served 20 and shadowed 0 requests")
    nothing = decide(arm_traffic("production", 400, version="1"))
    assert not nothing.trip and (nothing.canary_requests, nothing.baseline_requests) == (0, 400)


def test_in_shadow_mode_the_canary_is_judged_on_its_shadow_answers():
    policy = load_rollback_policy(DEFAULT_ROLLBACK_POLICY)
    shadowed = arm_traffic("production", 200, version="1", declared=100, shadow_identical=150, shadow_invalid=40)
    decision = decide(shadowed, policy)
    assert decision.enough_evidence and (decision.canary_requests, decision.canary_shadowed) == (0, 200)
    assert [(c.name, c.source) for c in decision.criteria if c.tripped] == [("validation_failure_excess", "shadow")]
    assert "canary (shadow) 0.400" in decision.reasons[0] and decision.canary_versions == {"2": 200}
    assert {c.source for c in decision.criteria} == {"shadow"}  # no served canary request to judge
    fine = decide(arm_traffic("production", 200, version="1", declared=100, shadow_identical=150), policy)
    assert fine.enough_evidence and not fine.trip
    few = decide(arm_traffic("production", 40, version="1", shadow_identical=0), policy)
    assert not few.enough_evidence and "shadowed 40 requests" in few.summary


def test_a_criterion_with_nothing_to_measure_is_reported_not_tripped():
    decision = decide(arm_traffic("production", 100, version="1") + arm_traffic("canary", 100, version="2"))
    (criterion,) = decision.criteria
    assert not criterion.measurable and not criterion.tripped and "not measurable" in criterion.evidence
    assert not decision.trip and "not measurable: validation_failure_excess" in decision.summary


def test_latency_errors_refusals_and_shadow_agreement():
    policy = load_rollback_policy(DEFAULT_ROLLBACK_POLICY)
    production = arm_traffic("production", 200, version="1", latency=0.2, errors=2, shadow_identical=190)
    same = decide(production + arm_traffic("canary", 200, version="2", latency=0.21, errors=3), policy)
    assert not same.trip and {c.name for c in same.criteria} == {
        "validation_failure_excess", "error_rate_excess", "timeout_rate_excess", "refusal_rate_excess",
        "p95_latency_ratio", "shadow_identical_min",
    }, same.summary  # fmt: skip
    slow = decide(production + arm_traffic("canary", 200, version="2", latency=0.6), policy)
    assert slow.trip and [c.name for c in slow.criteria if c.tripped] == ["p95_latency_ratio"]
    (latency,) = [c for c in slow.criteria if c.tripped]
    assert 2.5 < latency.estimate < 3.5 and latency.low > 1.5 and latency.method.startswith("percentile bootstrap")
    broken = decide(production + arm_traffic("canary", 200, version="2", errors=40, refused=60), policy)
    assert {c.name for c in broken.criteria if c.tripped} == {"error_rate_excess", "refusal_rate_excess"}
    disagreeing = arm_traffic("production", 200, version="1", shadow_identical=10)
    shadow = decide(disagreeing + arm_traffic("canary", 200, version="2"), policy)
    assert [c.name for c in shadow.criteria if c.tripped] == ["shadow_identical_min"]
    assert "10/200" in shadow.reasons[0]


def test_evidence_about_an_earlier_canary_version_is_left_out():
    rows = arm_traffic("production", 100, version="1", shadow_identical=50, shadow_version="2")
    rows += arm_traffic("canary", 100, version="2") + arm_traffic("canary", 30, version="3")
    kept = about_version([LoggedRequest.model_validate(r) for r in rows], "canary", "3")
    assert sum(1 for e in kept if e.served_arm == "canary") == 30 and len(kept) == 130
    assert all(e.shadow is None for e in kept)  # the shadows were answered by version 2


def test_the_shipped_policy_loads():
    policy = load_rollback_policy(DEFAULT_ROLLBACK_POLICY)
    assert (policy.min_requests_per_arm, policy.validation_failure_excess, policy.p95_latency_ratio) == (50, 0.05, 1.5)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: x\nvalidation_failure_excess: 0.05\n", "field `min_requests_per_arm`: Field required"),
        ("name: x\nmin_requests_per_arm: 50\nvalidation_failure_exces: 0.05\n", "field `validation_failure_exces`"),
        ("name: x\nmin_requests_per_arm: 50\np95_latency_ratio: 0.8\n", "field `p95_latency_ratio`: Input should be"),
        ("name: x\nmin_requests_per_arm: 0\nerror_rate_excess: 0.1\n", "field `min_requests_per_arm`"),
        ("name: x\nmin_requests_per_arm: lots\nerror_rate_excess: 0.1\n", "field `min_requests_per_arm`"),
        ("name: x\nmin_requests_per_arm: 50\n", "no threshold set"),
        ("name: [x\n", "not valid YAML"),
        ("- a list\n", "expected a mapping"),
    ],
)
def test_an_unusable_policy_file_is_refused_in_one_line_naming_file_and_field(tmp_path, text, expected):
    path = tmp_path / "rollback.yaml"
    path.write_text(text)
    with pytest.raises(RollbackPolicyError) as refused:
        load_rollback_policy(path)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(str(path)) and expected in message, message


def test_a_missing_policy_file_names_the_setting(tmp_path):
    with pytest.raises(RollbackPolicyError, match="QP_ROLLBACK_POLICY"):
        load_rollback_policy(tmp_path / "gone.yaml")


def test_the_policy_path_is_a_resource_setting_read_from_the_environment(monkeypatch, tmp_path):
    assert MonitoringSettings().rollback_policy_file == str(DEFAULT_ROLLBACK_POLICY)
    monkeypatch.setenv("QP_ROLLBACK_POLICY", str(tmp_path / "strict.yaml"))
    monkeypatch.setenv("QP_STORE_DIR", str(tmp_path / "store"))
    settings = MonitoringSettings.from_env()
    assert settings.rollback_policy_file == str(tmp_path / "strict.yaml") and settings.store.root == tmp_path / "store"
    deferred = build_resources(deferred=True)["monitoring"]  # what `dagster dev` loads: resolved per run
    assert deferred.rollback_policy_file == dg.EnvVar("QP_ROLLBACK_POLICY")
