"""Red team, sign-off evidence (#12 cases 2, 3 and 7): an approval rests on what was recorded outside the
store's folders — the report hash in the anchored trail, the content hash in the MLflow registry — so
editing the files a decision reads, together with the record beside them, gets a one-line refusal."""

import json

import pytest

from quant_pipeline.core.hashing import file_hashes, tree_hash
from quant_pipeline.core.tracking import APPROVED_ALIAS
from quant_pipeline.release import signoff
from quant_pipeline.release.evidence import EvidenceError, report_path
from quant_pipeline.release.trail import read_entries
from quant_pipeline_tests.support import change_policy, replace, run_audit

FAILS = (
    "name: always-fails\nmin_items: 1\n"
    "tolerances:\n  kl_divergence: {direction: lower_is_better, mode: absolute, tolerance: 0.0}\n"
)


def test_a_failed_report_edited_to_passed_is_refused(audited):
    settings, artifact, tracker, instance = audited
    change_policy(settings, tracker, artifact["model_name"], FAILS)
    result = run_audit(settings, tracker, instance, selection=["delta_report"])
    assert result.output_for_node("delta_report")["passed"] is False
    report = report_path(settings.store, artifact["model_name"], artifact["artifact_id"])
    doc = json.loads(report.read_text())
    report.write_text(json.dumps({**doc, "verdict": "PASS", "passed": True, "failing": [], "reasons": []}))
    with pytest.raises(EvidenceError, match="not the report the gate judged") as refused:
        signoff.approve(settings.store, tracker, artifact["artifact_id"], by="Mallory", note="looks fine to me")
    assert "\n" not in str(refused.value)
    assert tracker.alias_version(artifact["model_name"], APPROVED_ALIAS) is None


def test_rewritten_weights_with_a_matching_record_are_refused_against_the_registry(audited):
    settings, artifact, tracker, _ = audited
    aid = artifact["artifact_id"]
    folder = settings.store.artifact_dir(aid)
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one byte of the weights
    weights.write_bytes(bytes(data))
    record_path = settings.store.artifact_record_path(aid)
    record = json.loads(record_path.read_text())
    files = file_hashes(folder)
    record_path.write_text(json.dumps({**record, "files": files, "content_hash": tree_hash(files)}))
    with pytest.raises(EvidenceError, match="MLflow registry holds") as refused:
        signoff.approve(settings.store, tracker, aid, by="Mallory", note="hashes match, ship it")
    assert "\n" not in str(refused.value)


def test_a_promotion_re_verifies_the_bytes_against_the_registry(audited):
    settings, artifact, tracker, _ = audited
    aid = artifact["artifact_id"]
    signoff.approve(settings.store, tracker, aid, by="Ada", note="reviewed")
    tokenizer = settings.store.artifact_dir(aid) / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text() + " ")
    with pytest.raises(Exception, match="tokenizer.json: content changed"):
        signoff.promote(settings.store, tracker, aid, by="Ada")
    assert tracker.alias_version(artifact["model_name"], signoff.PRODUCTION_ALIAS) is None


def test_a_policy_only_rerun_keeps_a_standing_approval(audited):
    settings, artifact, tracker, instance = audited
    aid = artifact["artifact_id"]
    signoff.approve(settings.store, tracker, aid, by="Ada", note="reviewed")
    rerun = run_audit(replace(settings), tracker, instance, selection=["delta_report", "approval"])
    assert rerun.success and rerun.output_for_node("approval")["decision"] == "approved"
    version = tracker.model_version(artifact["model_name"], aid)
    assert version.tags["approval"] == "approved" and tracker.alias_version(artifact["model_name"], APPROVED_ALIAS)


def test_a_failing_re_audit_revokes_the_approval_and_moves_production_back(audited):
    settings, artifact, tracker, instance = audited
    aid, name = artifact["artifact_id"], artifact["model_name"]
    signoff.approve(settings.store, tracker, aid, by="Ada", note="reviewed")
    signoff.promote(settings.store, tracker, aid, by="Ada", note="go live")
    change_policy(settings, tracker, name, FAILS)  # a stricter bar at the next periodic re-audit
    rerun = run_audit(settings, tracker, instance, selection=["delta_report", "approval"])
    assert rerun.success  # a FAIL is recorded, not crashed on
    checks = {c.check_name: c for c in rerun.get_asset_check_evaluations()}
    revoked = checks["slices_within_tolerance"].metadata["approval_revoked"].value
    assert not checks["slices_within_tolerance"].passed and "kl_divergence" in revoked and "production" in revoked
    assert not signoff.is_approved(settings.store, name, aid)
    assert tracker.alias_version(name, APPROVED_ALIAS) is None
    production = tracker.client().get_model_version(name, tracker.alias_version(name, signoff.PRODUCTION_ALIAS))
    assert production.tags["kind"] == "base"  # no other approved version: the kept base serves
    assert tracker.model_version(name, aid).tags["approval"] == "rejected"  # revoked, then rejected by the gate
    events = [e["event"] for e in read_entries(settings.store.trail_path(name))]
    assert events[-3:] == ["evaluated", "revoked", "rejected"]
    with pytest.raises(Exception, match="not approved"):
        signoff.promote(settings.store, tracker, aid, by="Ada")
