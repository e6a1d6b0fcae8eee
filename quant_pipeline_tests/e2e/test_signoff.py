"""Sign-off, promotion, rollback and the living audit trail, over a scripted release history."""

import json
from pathlib import Path

import pytest

from quant_pipeline.core.artifacts import artifact_problems
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.tracking import APPROVED_ALIAS
from quant_pipeline.defs.automation import CALIBRATION_STAGES
from quant_pipeline.release import registry, signoff
from quant_pipeline.release.mlbom import validate_mlbom
from quant_pipeline.release.report import write_report
from quant_pipeline.release.trail import verify_trail
from quant_pipeline_tests.support import change_policy, replace, run_audit

IMPOSSIBLE = (
    "name: impossible\nmin_items: 1\nallow_override: {allow}\ntolerances:\n"
    "  kl_divergence: {{direction: lower_is_better, mode: absolute, tolerance: 0.0}}\n"
)


def failed_audit(tiny_settings, tracker, instance, tmp_path, allow_override: bool):
    policy = tmp_path / "impossible.yaml"
    policy.write_text(IMPOSSIBLE.format(allow=str(allow_override).lower()))
    settings = replace(tiny_settings, policy_file=str(policy))
    result = run_audit(settings, tracker, instance)
    assert result.success and result.output_for_node("delta_report")["verdict"] == "FAIL"
    assert result.output_for_node("approval")["decision"] == "rejected by the gate"
    return settings, result.output_for_node("quantized_artifact")


def test_approval_needs_a_named_approver_and_a_rationale(audited):
    settings, artifact, mlflow_tracker, instance = audited
    with pytest.raises(signoff.SignOffError, match="named approver"):
        signoff.approve(settings.store, mlflow_tracker, artifact["artifact_id"], by="", note="looks fine")
    with pytest.raises(signoff.SignOffError, match="rationale"):
        signoff.approve(settings.store, mlflow_tracker, artifact["artifact_id"], by="Ada", note="")
    assert mlflow_tracker.alias_version(artifact["model_name"], APPROVED_ALIAS) is None


def test_failed_checks_cannot_be_approved_and_override_needs_two_people(
    tiny_settings, mlflow_tracker, instance, tmp_path
):
    settings, artifact = failed_audit(tiny_settings, mlflow_tracker, instance, tmp_path, allow_override=False)
    aid = artifact["artifact_id"]
    with pytest.raises(signoff.SignOffError, match="rejected by the gate"):
        signoff.approve(settings.store, mlflow_tracker, aid, by="Ada", note="ship it")
    with pytest.raises(signoff.SignOffError, match="does not allow overrides"):
        signoff.approve(
            settings.store, mlflow_tracker, aid, by="Ada", note="ship it", second_approver="Bob", override=True
        )

    # the policy owner allows two-person overrides, on the record; the artifact is judged again under it
    change_policy(settings, mlflow_tracker, artifact["model_name"], IMPOSSIBLE.format(allow="true"))
    rejudged = run_audit(settings, mlflow_tracker, instance, selection=["delta_report", "approval"])
    assert rejudged.output_for_node("approval")["decision"] == "rejected by the gate"
    with pytest.raises(signoff.SignOffError, match="second named approver"):
        signoff.approve(settings.store, mlflow_tracker, aid, by="Ada", note="known regression, accepted", override=True)
    with pytest.raises(signoff.SignOffError, match="second named approver"):
        signoff.approve(settings.store, mlflow_tracker, aid, by="Ada", note="x", second_approver="Ada", override=True)
    entry = signoff.approve(
        settings.store,
        mlflow_tracker,
        aid,
        by="Ada",
        note="known regression, accepted",
        second_approver="Bob",
        override=True,
    )
    assert entry["override"] is True and entry["second_approver"] == "Bob"
    version = mlflow_tracker.client().get_model_version(artifact["model_name"], artifact["registry_version"])
    assert version.tags["approval"] == "approved (override)"
    md, _ = write_report(settings.store, mlflow_tracker, artifact["model_name"])
    assert "OVERRIDE" in md.read_text()


def test_tampered_artifact_fails_verify_and_approval(audited):
    settings, artifact, mlflow_tracker, instance = audited
    aid = artifact["artifact_id"]
    assert artifact_problems(settings.store, aid) == []
    with open(Path(artifact["path"]) / "tokenizer.json", "a") as f:
        f.write(" ")
    assert artifact_problems(settings.store, aid) == ["tokenizer.json: content changed"]
    with pytest.raises(AuditInputError, match="tokenizer.json: content changed"):
        signoff.approve(settings.store, mlflow_tracker, aid, by="Ada", note="fine")
    assert mlflow_tracker.alias_version(artifact["model_name"], APPROVED_ALIAS) is None


def test_edited_trail_entry_fails_verification(audited):
    settings, artifact, mlflow_tracker, instance = audited
    path = signoff.trail_path(settings.store, artifact["model_name"])
    assert verify_trail(path) == []
    lines = path.read_text().splitlines()
    entry = json.loads(lines[1])
    entry["passed"] = not entry.get("passed")
    lines[1] = json.dumps(entry)
    path.write_text("\n".join(lines) + "\n")
    problems = verify_trail(path)
    assert problems and "edited" in problems[0]


def test_base_checkpoint_cannot_be_deleted_while_artifacts_depend_on_it(audited, tiny_llama):
    settings, artifact, mlflow_tracker, instance = audited
    with pytest.raises(AuditInputError, match=artifact["artifact_id"]):
        registry.delete_base(settings.store, tiny_llama)
    assert (tiny_llama / "model.safetensors").exists()


def test_mlbom_of_an_audited_artifact_validates_against_cyclonedx_1_6(audited):
    settings, artifact, mlflow_tracker, instance = audited
    path = registry.write_bom(settings.store, artifact["artifact_id"])
    doc = json.loads(path.read_text())
    validate_mlbom(doc)
    assert doc["specVersion"] == "1.6"
    model = doc["metadata"]["component"]
    assert model["type"] == "machine-learning-model" and model["bom-ref"] == artifact["artifact_id"]
    assert model["pedigree"]["ancestors"][0]["hashes"][0]["content"] == artifact["base_hash"]


def test_scripted_release_history_moves_aliases_and_shows_in_the_audit_report(audited):
    settings, first, mlflow_tracker, instance = audited
    store, name = settings.store, first["model_name"]
    signoff.approve(store, mlflow_tracker, first["artifact_id"], by="Ada", note="first release")
    signoff.promote(store, mlflow_tracker, first["artifact_id"], by="Ada", note="go live")
    assert mlflow_tracker.alias_version(name, signoff.PRODUCTION_ALIAS) == first["registry_version"]

    calibration = Path(settings.calibration_file)
    calibration.write_text("\n".join(reversed(calibration.read_text().splitlines())) + "\n")
    second = run_audit(
        settings,
        mlflow_tracker,
        instance,
        selection=CALIBRATION_STAGES,
        tags={
            "quant_pipeline/trigger": "calibration",
            "quant_pipeline/from_version": "calibration.jsonl@old",
            "quant_pipeline/to_version": "calibration.jsonl@new",
        },
    )
    assert second.success
    new = second.output_for_node("quantized_artifact")
    with pytest.raises(signoff.SignOffError, match="not approved"):
        signoff.promote(store, mlflow_tracker, new["artifact_id"], by="Ada")
    signoff.approve(store, mlflow_tracker, new["artifact_id"], by="Grace", note="recalibrated")
    signoff.promote(store, mlflow_tracker, new["artifact_id"], by="Grace", note="roll out")
    assert mlflow_tracker.alias_version(name, APPROVED_ALIAS) == new["registry_version"]
    assert mlflow_tracker.alias_version(name, signoff.PRODUCTION_ALIAS) == new["registry_version"]

    back = signoff.rollback(store, mlflow_tracker, name, by="Grace", note="latency complaints")
    assert back["registry_version"] == first["registry_version"] and not back["to_base"]
    assert mlflow_tracker.alias_version(name, signoff.PRODUCTION_ALIAS) == first["registry_version"]
    base = signoff.rollback(store, mlflow_tracker, name, by="Grace", note="incident: full precision", to_base=True)
    assert (
        base["to_base"]
        and mlflow_tracker.client().get_model_version(name, base["registry_version"]).tags["kind"] == "base"
    )

    md, page = write_report(store, mlflow_tracker, name)
    text = md.read_text()
    events = [
        line.split("|")[3].strip()
        for line in text.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    ]
    assert events == [
        "audit",
        "policy pinned",
        "evaluated",
        "pending sign-off",
        "approved",
        "promoted",
        "audit",
        "evaluated",
        "pending sign-off",
        "approved",
        "promoted",
        "rollback",
        "rollback",
    ]
    assert "trigger calibration: calibration.jsonl@old → calibration.jsonl@new" in text
    assert "Trail integrity: intact" in text and "<html" in page.read_text()
