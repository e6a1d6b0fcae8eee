"""Identity by content and name (#17): a registered model is what its name says, an artifact belongs to one
model, the calibration an artifact read is the samples it used, and the same approved bytes under a new ID are
not signed off twice. Real parts: Dagster, MLflow on SQLite, the tiny random Llama."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pytest

from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.recipe import Recipe, candidate_key
from quant_pipeline.core.records import ArtifactRecord
from quant_pipeline.defs import inputs
from quant_pipeline.defs.automation import CANDIDATES_TAG, calibration_data_sensor
from quant_pipeline.models.calibration import load_calibration_texts, tokenizer_hash_of, used_samples_hash
from quant_pipeline.release import signoff
from quant_pipeline.release.trail import read_entries
from quant_pipeline_tests.support import fresh_audit_world, replace, run_audit

UP_TO_ARTIFACT = ["base_checkpoint", "calibration_set", "runtime_environment", "quantized_artifact"]
JUDGED = ["base_eval_results", "quantized_eval_results", "delta_report"]


def copy_model(source: Path, to: Path) -> str:
    return str(shutil.copytree(source, to))


def trail_versions_exist(settings, tracker, name: str) -> list[dict]:
    """Every trail entry that names a registry version names one the model's registry holds for that artifact."""
    entries = read_entries(settings.store.trail_path(name))
    for e in entries:
        if e.get("registry_version") and e.get("artifact_id"):
            mv = tracker.model_version(name, e["artifact_id"])
            assert mv is not None and str(mv.version) == str(e["registry_version"]), (name, e["event"])
    return entries


def test_the_same_weights_in_folders_of_two_names_keep_each_model_s_own_trail_and_versions(tmp_path, tiny_llama):
    settings, tracker = fresh_audit_world(tmp_path, tiny_llama)
    qwen2 = replace(settings, model=copy_model(tiny_llama, tmp_path / "a" / "qwen2"))
    final = replace(settings, model=copy_model(tiny_llama, tmp_path / "b" / "final"))
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        first, second = run_audit(qwen2, tracker, instance), run_audit(final, tracker, instance)
    assert first.success and second.success
    one, two = first.output_for_node("quantized_artifact"), second.output_for_node("quantized_artifact")
    assert (one["model_name"], two["model_name"]) == ("qwen2", "final") and one["artifact_id"] != two["artifact_id"]
    assert one["content_hash"] == two["content_hash"]  # the same bytes, each model's own artifact
    assert second.output_for_node("delta_report")["model_name"] == "final"
    for name, artifact in (("qwen2", one), ("final", two)):
        assert ArtifactRecord.read(settings.store.artifact_record_path(artifact["artifact_id"])).model_name == name
        entries = trail_versions_exist(settings, tracker, name)
        assert {e.get("artifact_id") for e in entries if e.get("event") == "evaluated"} == {artifact["artifact_id"]}
        assert signoff.verify_model_trail(settings.store, tracker, name) == []


def test_two_models_in_folders_of_the_same_name_cannot_share_a_trail(tmp_path, tiny_llama):
    settings, tracker = fresh_audit_world(tmp_path, tiny_llama)
    first = replace(settings, model=copy_model(tiny_llama, tmp_path / "x" / "final"))
    other = Path(copy_model(tiny_llama, tmp_path / "y" / "final"))
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))  # another architecture
    second = replace(settings, model=str(other))
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        assert run_audit(first, tracker, instance, selection=UP_TO_ARTIFACT).success
        refused = run_audit(second, tracker, instance, selection=UP_TO_ARTIFACT)
        assert not refused.success and refused.get_asset_materialization_events() == []  # refused before any stage
        failure = next(e for e in refused.all_events if e.is_failure)
        text = failure.message + str(failure.event_specific_data)
        assert "model final" in text and "num_hidden_layers=2" in text and "num_hidden_layers=1" in text
        assert "QP_MODEL_NAME" in text and "QP_NEW_BASE_VERSION=1" in text
        named = run_audit(replace(second, model_name="final-1layer"), tracker, instance, selection=UP_TO_ARTIFACT)
        assert named.success and named.output_for_node("quantized_artifact")["model_name"] == "final-1layer"
        declared = run_audit(replace(second, new_base_version=True), tracker, instance, selection=UP_TO_ARTIFACT)
        assert declared.success
    audits = [e for e in read_entries(settings.store.trail_path("final")) if e["event"] == "audit"]
    assert [e["base_architecture"]["num_hidden_layers"] for e in audits] == [2, 1]
    assert [e["new_base_version"] for e in audits] == [False, True]


def calibration_tick(instance, settings, tracker, cursor: str | None) -> tuple[list, str | None, str | None]:
    """One tick of the calibration sensor: its run requests, its skip message, its new cursor."""
    resources = {"settings": settings, "mlflow": tracker}
    with dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources) as context:
        result = calibration_data_sensor(context)
    skip = result.skip_reason.skip_message if result.skip_reason else None
    return result.run_requests or [], skip, result.cursor or cursor


def test_editing_a_calibration_line_no_recipe_reads_keeps_the_artifact_and_its_version(tmp_path, tiny_llama):
    """...and the calibration sensor re-audits nothing for it; an edit of a sample the recipe reads re-audits."""
    settings, tracker = fresh_audit_world(tmp_path, tiny_llama)
    calibration = Path(settings.calibration_file)
    lines = calibration.read_text().splitlines()
    first = lines[0]
    assert len(lines) > settings.recipe.calibration_samples + 1
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        before = run_audit(settings, tracker, instance, selection=UP_TO_ARTIFACT).output_for_node("quantized_artifact")
        _, skip, cursor = calibration_tick(instance, settings, tracker, None)
        assert "unchanged" in skip
        lines[-1] = json.dumps({"text": "a line after the samples the recipe reads, edited"})
        calibration.write_text("\n".join(lines) + "\n")
        requests, skip, unused = calibration_tick(instance, settings, tracker, cursor)
        assert requests == [] and "outside the samples every audited candidate reads" in skip
        lines[0] = json.dumps({"text": "the first sample, which the recipe reads, edited"})
        calibration.write_text("\n".join(lines) + "\n")
        requests, _, _ = calibration_tick(instance, settings, tracker, unused)
        assert len(requests) == 1 and requests[0].tags[CANDIDATES_TAG] == candidate_key(settings.recipe)
        # Red team: whoever can write the store sets the trail's hash to the edited samples' to silence that
        # re-audit. The trail no longer verifies against its MLflow anchor, so its hash is not believed.
        trail = settings.store.trail_path(before["model_name"])
        kept = trail.read_bytes()
        record = read_artifact_record(settings.store, before["artifact_id"])
        edited = used_samples_hash(
            load_calibration_texts(calibration), Recipe(**record.recipe), tokenizer_hash_of(Path(record.base_path))
        )
        forged = [{**e, "calibration_hash": edited} if e.get("event") == "audit" else e for e in read_entries(trail)]
        trail.write_text("".join(json.dumps(e) + "\n" for e in forged))
        requests, _, _ = calibration_tick(instance, settings, tracker, unused)
        assert len(requests) == 1, "a forged trail hash silenced a calibration re-audit"
        trail.write_bytes(kept)
        lines[0] = first  # back to the samples the artifact read: the audit below reuses it
        calibration.write_text("\n".join(lines) + "\n")
        after = run_audit(settings, tracker, instance, selection=UP_TO_ARTIFACT).output_for_node("quantized_artifact")
        assert (after["artifact_id"], after["registry_version"], after["reused"]) == (
            before["artifact_id"], before["registry_version"], True,
        )  # fmt: skip
        audits = [e for e in read_entries(settings.store.trail_path(after["model_name"])) if e["event"] == "audit"]
        assert audits[-1]["calibration_file_hash"] != audits[-2]["calibration_file_hash"]  # the edit is on record
        lines[0] = json.dumps({"text": "the first sample, which the recipe reads, edited"})
        calibration.write_text("\n".join(lines) + "\n")
        used = run_audit(settings, tracker, instance, selection=UP_TO_ARTIFACT).output_for_node("quantized_artifact")
    assert used["artifact_id"] != before["artifact_id"] and used["calibration_hash"] != before["calibration_hash"]


def test_byte_identical_weights_under_a_new_id_carry_the_approval_over_and_rewritten_bytes_never_do(
    tmp_path, tiny_llama, monkeypatch
):
    settings, tracker = fresh_audit_world(tmp_path, tiny_llama)
    settings = replace(settings, recipe=Recipe(method="identity"))  # the base's bytes: identical on every run
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        approved = run_audit(settings, tracker, instance, approver="Ada Lovelace", note="zero deltas")
        assert approved.success and approved.output_for_node("approval")["event"] == "approved"
        real = inputs.runtime_fingerprint  # a runtime upgrade that changes nothing in the bytes: a new artifact ID
        monkeypatch.setattr(inputs, "runtime_fingerprint", lambda: {**real(), "python": real()["python"] + "+upgrade"})
        judged = run_audit(settings, tracker, instance, selection=[*UP_TO_ARTIFACT, *JUDGED])  # PASS, not yet decided
        assert judged.success
        new = judged.output_for_node("quantized_artifact")
        forge_and_refuse(settings, tracker, new)  # nothing an attacker rewrites in the store carries the approval
        again = run_audit(settings, tracker, instance, selection=["approval"])
    assert again.success
    old = approved.output_for_node("quantized_artifact")
    assert new["artifact_id"] != old["artifact_id"] and new["registry_version"] != old["registry_version"]
    assert new["content_hash"] == old["content_hash"]
    carried = again.output_for_node("approval")
    assert carried["event"] == "approved" and carried["carried_from"] == old["artifact_id"]
    assert set(carried["changed"]) == {"runtime_hash"} and carried["content_hash"] == old["content_hash"]
    assert "Ada Lovelace" in carried["by"] and "carried over" in carried["by"]
    name = new["model_name"]
    assert signoff.is_approved(settings.store, name, new["artifact_id"])
    assert tracker.alias_version(name, "approved") == new["registry_version"]
    assert signoff.verify_model_trail(settings.store, tracker, name) == []


def forge_and_refuse(settings, tracker, artifact: dict) -> None:
    """Whoever can write the store (and tag MLflow versions) tries to make other weights ride on the approval of
    identical ones: (1) new weights, the record still claiming the approved hash; (2) new weights with the record
    and the registry's tag rewritten to match them. The bytes are re-hashed and the trail, anchored outside the
    store, still holds the audited hash: both refused in one line, the version stays unapproved, and the genuine
    bytes, put back, carry the approval as before."""
    from safetensors.torch import load_file, save_file

    from quant_pipeline.core.errors import AuditInputError
    from quant_pipeline.core.hashing import RECORD_FILE, file_hashes, tree_hash
    from quant_pipeline.release.carry import carry_approval
    from quant_pipeline.release.evidence import EvidenceError

    store, aid, name = settings.store, artifact["artifact_id"], artifact["model_name"]
    folder = store.artifact_dir(aid)
    genuine = shutil.copytree(folder, settings.store.root.parent / "genuine")
    weights = load_file(folder / "model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 0.5
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(AuditInputError, match=f"artifact {aid} failed hash verification: model.safetensors"):
        carry_approval(store, tracker, aid)

    record = ArtifactRecord.read(folder / RECORD_FILE)
    files = file_hashes(folder)
    record.model_copy(update={"files": files, "content_hash": tree_hash(files)}).write(folder / RECORD_FILE)
    tracker.set_version_tags(name, artifact["registry_version"], {"content_hash": tree_hash(files)})
    with pytest.raises(EvidenceError, match=f"artifact {aid} hashes to .* but the trail holds"):
        carry_approval(store, tracker, aid)
    assert not signoff.is_approved(store, name, aid)
    assert tracker.alias_version(name, "approved") != artifact["registry_version"]

    shutil.rmtree(folder)
    shutil.copytree(genuine, folder)
    tracker.set_version_tags(name, artifact["registry_version"], {"content_hash": artifact["content_hash"]})
