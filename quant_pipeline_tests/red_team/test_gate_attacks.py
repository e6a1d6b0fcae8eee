"""Red team, the gate's verdict and the policy behind it (#12 cases 1 and 8, and "a FAIL is an outcome").

An audit that could not show a regression is INCOMPLETE and cannot be approved; a FAIL is recorded in
full (the gate's rejection, the audit report, the ML-BOM, the registry tag) and nothing approves the
artifact later; a laxer policy file is refused unless it is pinned on the record, and even then the
FAIL report stays as it was, beside the new one.
"""

import json
from pathlib import Path

import pytest

from quant_pipeline.cli import main
from quant_pipeline.cli.audit import audit_outcome
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.paths import DEFAULT_POLICY
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.tracking import APPROVED_ALIAS
from quant_pipeline.release import signoff
from quant_pipeline.release.evidence import report_path
from quant_pipeline.release.signoff import SignOffError
from quant_pipeline.release.trail import read_entries
from quant_pipeline_tests.support import LENIENT, change_policy, replace, run_audit

FAILS = (
    "name: always-fails\nmin_items: 1\n"
    "tolerances:\n  kl_divergence: {direction: lower_is_better, mode: absolute, tolerance: 0.0}\n"
)
GATE_STAGES = ["delta_report", "approval", "audit_report"]


def test_a_two_bit_audit_on_four_items_is_incomplete_and_cannot_be_approved(
    tiny_settings, mlflow_tracker, instance, tmp_path
):
    """Case 1: under the shipped policy (20 items per slice) four items measure nothing: INCOMPLETE."""
    settings = replace(
        tiny_settings, recipe=Recipe(bits=2, group_size=64, calibration_samples=8, seq_len=64),
        policy_file=str(DEFAULT_POLICY),
    )  # fmt: skip
    result = run_audit(settings, mlflow_tracker, instance, approver="Mallory", note="ship it")
    assert result.success  # a verdict, not a crash
    report = result.output_for_node("delta_report")
    assert report["verdict"] == "INCOMPLETE" and not report["passed"] and report["incomplete"]
    assert any("paired item(s), the policy needs 20" in n["reason"] for n in report["incomplete"])
    decision = result.output_for_node("approval")
    assert decision["decision"] == "incomplete: not approvable" and decision["by"] == "the gate"
    artifact = result.output_for_node("quantized_artifact")
    aid, name = artifact["artifact_id"], artifact["model_name"]
    with pytest.raises(SignOffError, match="INCOMPLETE .* only a PASS can be approved") as refused:
        signoff.approve(settings.store, mlflow_tracker, aid, by="Mallory", note="ship it")
    assert "\n" not in str(refused.value)
    assert mlflow_tracker.alias_version(name, APPROVED_ALIAS) is None
    assert mlflow_tracker.model_version(name, aid).tags["approval"] == "incomplete (not approvable)"
    assert mlflow_tracker.model_version(name, aid).tags["verdict"] == "INCOMPLETE"


def test_a_failed_gate_is_recorded_in_full_and_nothing_approves_it_later(audited):
    settings, artifact, tracker, instance = audited
    aid, name = artifact["artifact_id"], artifact["model_name"]
    change_policy(settings, tracker, name, FAILS)
    result = run_audit(settings, tracker, instance, approver="Ada", note="reviewed", selection=GATE_STAGES)
    assert result.success
    assert result.output_for_node("delta_report")["verdict"] == "FAIL"
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["slices_within_tolerance"] is False
    decision = result.output_for_node("approval")
    assert decision["decision"] == "rejected by the gate" and "kl_divergence" in decision["note"]
    assert (settings.store.report_dir(aid) / "mlbom.cdx.json").is_file()
    assert (settings.store.report_dir(name) / "audit_report.html").is_file()
    assert "rejected by the gate" in (settings.store.report_dir(name) / "audit_report.md").read_text()
    assert tracker.model_version(name, aid).tags["approval"] == "rejected"
    events = [e["event"] for e in read_entries(settings.store.trail_path(name))]
    assert events[-3:] == ["policy pinned", "evaluated", "rejected"]
    with pytest.raises(SignOffError, match="rejected by the gate .* cannot be approved later"):
        signoff.approve(settings.store, tracker, aid, by="Ada", note="I insist")
    assert tracker.alias_version(name, APPROVED_ALIAS) is None


def failed_under_a_stricter_policy(audited) -> tuple[Path, str]:
    """Pin the always-failing policy on the record and re-judge: the FAIL report's path and sha256."""
    settings, artifact, tracker, instance = audited
    change_policy(settings, tracker, artifact["model_name"], FAILS)
    assert run_audit(settings, tracker, instance, selection=GATE_STAGES).success
    failed = report_path(settings.store, artifact["model_name"], artifact["artifact_id"])
    return failed, sha256_file(failed)


def test_a_laxer_policy_file_is_refused_not_judged(audited):
    """Case 8: after a FAIL, pointing the audit at a lenient file neither re-judges nor overwrites the FAIL."""
    settings, artifact, tracker, instance = audited
    aid, name = artifact["artifact_id"], artifact["model_name"]
    failed, digest = failed_under_a_stricter_policy(audited)
    lenient = Path(settings.policy_file).with_name("lenient.yaml")
    lenient.write_text(LENIENT)
    rerun = run_audit(replace(settings, policy_file=str(lenient)), tracker, instance, selection=GATE_STAGES)
    assert not rerun.success
    outcome = audit_outcome(rerun)
    assert outcome.code == 2 and "is not the policy governing" in outcome.error
    assert "quant-pipeline pin-policy" in outcome.error and "\n" not in outcome.error
    assert sha256_file(failed) == digest and report_path(settings.store, name, aid) == failed


def test_a_policy_change_on_the_record_is_a_new_report_beside_the_failed_one(audited):
    settings, artifact, tracker, instance = audited
    aid, name = artifact["artifact_id"], artifact["model_name"]
    failed, digest = failed_under_a_stricter_policy(audited)
    pinned = change_policy(settings, tracker, name, LENIENT)  # a named person loosens the bar, on the record
    assert pinned["by"] == "Policy Owner" and pinned["reason"] == "new bar" and pinned["previous_policy_hash"]
    rerun = run_audit(settings, tracker, instance, selection=GATE_STAGES)
    assert rerun.output_for_node("delta_report")["verdict"] == "PASS"
    assert report_path(settings.store, name, aid) != failed and sha256_file(failed) == digest  # both kept
    assert rerun.output_for_node("approval")["decision"] == "rejected by the gate"  # the FAIL still stands
    with pytest.raises(SignOffError, match="rejected by the gate"):
        signoff.approve(settings.store, tracker, aid, by="Ada", note="passes now")


def test_the_same_audit_twice_reuses_its_report_rather_than_rewriting_it(audited):
    settings, artifact, tracker, instance = audited
    aid, name = artifact["artifact_id"], artifact["model_name"]
    first = report_path(settings.store, name, aid)
    before = (first.stat().st_mtime_ns, sha256_file(first))
    assert run_audit(settings, tracker, instance, selection=["delta_report"]).success
    assert report_path(settings.store, name, aid) == first
    assert (first.stat().st_mtime_ns, sha256_file(first)) == before


def test_pinning_a_policy_needs_a_name_and_a_reason_and_shows_in_the_trail(audited, capsys, monkeypatch):
    settings, artifact, tracker, _ = audited
    name = artifact["model_name"]
    monkeypatch.setenv("QP_STORE_DIR", settings.store_dir)
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", tracker.tracking_uri)
    strict = Path(settings.policy_file).with_name("strict.yaml")
    strict.write_text(FAILS)
    assert main(["pin-policy", name, "--file", str(strict), "--by", "Ada"]) == 2
    assert "needs a name (--by NAME) and a reason" in capsys.readouterr().err
    assert main(["pin-policy", name, "--file", str(strict), "--by", "Ada", "--reason", "KL must not move"]) == 0
    assert main(["show-policy", name]) == 0
    out = capsys.readouterr().out
    assert "always-fails" in out and "pinned by Ada" in out and "KL must not move" in out
    pin = read_entries(settings.store.trail_path(name))[-1]
    assert (pin["event"], pin["by"], pin["policy_hash"]) == ("policy pinned", "Ada", sha256_file(strict))
    copy = settings.store.policy_path(pin["policy_hash"])
    assert copy.read_text() == FAILS and json.dumps(pin)


def test_an_upgraded_gate_judges_again_into_a_new_report(audited, monkeypatch):
    """The judging code is part of the report's key: new gate rules never hide behind an old verdict."""
    from quant_pipeline.defs import gate

    settings, artifact, tracker, instance = audited
    aid, name = artifact["artifact_id"], artifact["model_name"]
    old = report_path(settings.store, name, aid)
    monkeypatch.setattr(gate, "JUDGE_CODE", "0" * 64)  # as after an upgrade of evaluation/delta.py
    assert run_audit(settings, tracker, instance, selection=["delta_report"]).success
    new = report_path(settings.store, name, aid)
    assert new != old and old.is_file() and new.is_file()
