"""Re-audit on change: sensors fire once per change with the right tags, and work is reused by hash."""

import json
import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

from quant_pipeline.core.paths import DEFAULT_CALIBRATION
from quant_pipeline.core.recipe import Recipe, candidate_key
from quant_pipeline.core.runtime import fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.tracking import APPROVED_ALIAS
from quant_pipeline.definitions import AUDIT_ASSETS, AUDIT_CHECKS
from quant_pipeline.defs.automation import (
    ALL_STAGES,
    CALIBRATION_STAGES,
    CANDIDATES_TAG,
    FROM_TAG,
    FULL_HASH_SECONDS,
    STAGES_TAG,
    TO_TAG,
    TRIGGER_TAG,
    base_model_sensor,
    calibration_data_sensor,
    next_phases_sensor,
    runtime_sensor,
)
from quant_pipeline.defs.candidates import CANDIDATE_STAGES, register
from quant_pipeline.defs.recovery import HOST_TAG, PID_TAG
from quant_pipeline.defs.signoff import PENDING
from quant_pipeline_tests.support import LENIENT, TINY_RECIPE, change_policy, edit_first_sample, replace, run_audit


def audited(instance, model: str, *recipes: Recipe) -> str:
    """Register the model and mark each recipe audited for it (as a first audit's quantized_artifact would)."""
    key = register(instance, model)
    for recipe in recipes:
        register(instance, model, recipe)
        partition = dg.MultiPartitionKey({"model": key, "candidate": candidate_key(recipe)})
        instance.report_runless_asset_event(dg.AssetMaterialization("quantized_artifact", partition=str(partition)))
    return key


def tick(sensor, instance, cursor=None, settings=None, tracker=None):
    """One sensor evaluation; returns its run requests, its skip message and its new cursor."""
    resources = {"settings": settings} if settings is not None else {}
    resources |= {"mlflow": tracker} if tracker is not None else {}
    ctx = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
    result = sensor(ctx)
    if isinstance(result, dg.SkipReason):
        return [], result.skip_message, cursor
    requests = result.run_requests or []
    skip = result.skip_reason.skip_message if result.skip_reason else None
    return requests, skip, result.cursor or cursor


DATA_FREE = Recipe(method="torchao-int8-weight")


@pytest.fixture
def calibration_copy(tmp_path) -> Path:
    return Path(shutil.copy(DEFAULT_CALIBRATION, tmp_path / "calibration.jsonl"))


def test_calibration_change_requests_one_reaudit_of_the_affected_stages(
    tiny_settings, mlflow_tracker, instance, calibration_copy
):
    settings = replace(tiny_settings, calibration_file=str(calibration_copy))
    model = audited(instance, settings.model, settings.recipe, DATA_FREE)
    requests, skip, cursor = tick(calibration_data_sensor, instance, None, settings, mlflow_tracker)
    assert requests == [] and "no audit recorded yet" in skip
    requests, skip, cursor = tick(calibration_data_sensor, instance, cursor, settings, mlflow_tracker)
    assert requests == [] and "unchanged" in skip
    before = json.loads(cursor)["version"]

    edit_first_sample(calibration_copy, "A calibration sample about tide tables and harbour pilots.")
    requests, skip, cursor = tick(calibration_data_sensor, instance, cursor, settings, mlflow_tracker)
    assert len(requests) == 1  # the model's own stages first; its candidates follow once they succeed
    request = requests[0]
    assert request.partition_key == model and request.job_name == "model_stages"
    assert [k.to_user_string() for k in request.asset_selection] == ["calibration_set"]
    assert request.tags[CANDIDATES_TAG] == candidate_key(settings.recipe)  # the data-free one read no calibration
    assert request.tags[STAGES_TAG].split(",") == CALIBRATION_STAGES and "base_eval_results" not in CALIBRATION_STAGES
    assert request.tags[TRIGGER_TAG] == "calibration"
    assert request.tags[FROM_TAG] == before and request.tags[TO_TAG] == json.loads(cursor)["version"] != before

    # The same change seen again launches nothing more.
    requests, skip, _ = tick(calibration_data_sensor, instance, cursor, settings, mlflow_tracker)
    assert requests == [] and "unchanged" in skip


def test_base_model_sensor_watches_each_model_partition_on_its_own(tiny_settings, instance, tiny_llama, tmp_path):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    key = audited(instance, str(model), TINY_RECIPE, DATA_FREE)
    other = audited(instance, str(tiny_llama), TINY_RECIPE)
    _, skip, cursor = tick(base_model_sensor, instance, None, tiny_settings)
    _, skip, cursor = tick(base_model_sensor, instance, cursor, tiny_settings)
    assert f"{key} unchanged" in skip and f"{other} unchanged" in skip
    before = json.loads(cursor)[key]["version"]

    config = json.loads((model / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5 if config.get("rms_norm_eps") != 1e-5 else 1e-6
    (model / "config.json").write_text(json.dumps(config))
    requests, _, cursor = tick(base_model_sensor, instance, cursor, tiny_settings)
    assert len(requests) == 1 and requests[0].partition_key == key  # the other model did not change
    assert requests[0].tags[TRIGGER_TAG] == "base_model" and requests[0].tags[FROM_TAG] == before
    assert requests[0].tags[TO_TAG].startswith("model@") and requests[0].tags[STAGES_TAG].split(",") == ALL_STAGES
    assert sorted(requests[0].tags[CANDIDATES_TAG].split(",")) == sorted(
        [candidate_key(TINY_RECIPE), "torchao-int8-weight"]
    )
    assert tick(base_model_sensor, instance, cursor, tiny_settings)[0] == []

    fresh = register(instance, str(shutil.copytree(tiny_llama, tmp_path / "never-audited")))
    requests, skip, _ = tick(base_model_sensor, instance, cursor, tiny_settings)
    assert requests == [] and f"{fresh}: no audit recorded yet" in skip  # a new model partition: audit it first


def test_base_model_sensor_hashes_on_schedule_a_change_that_keeps_sizes_and_mtimes(
    tiny_settings, instance, tiny_llama, tmp_path
):
    model = Path(shutil.copytree(tiny_llama, tmp_path / "model"))
    key = audited(instance, str(model), TINY_RECIPE)
    _, _, cursor = tick(base_model_sensor, instance, None, tiny_settings)
    config, before = model / "config.json", model.joinpath("config.json").stat()
    text = config.read_text()
    edited = text.replace('"num_attention_heads": 4', '"num_attention_heads": 2')
    assert edited != text and len(edited) == len(text)
    config.write_text(edited)
    os.utime(config, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same size and mtime: the cheap check sees none
    requests, skip, cursor = tick(base_model_sensor, instance, cursor, tiny_settings)
    assert requests == [] and "same files, sizes and mtimes" in skip
    state = json.loads(cursor)
    state[key]["hashed_at"] -= FULL_HASH_SECONDS  # the full hash is due
    requests, _, cursor = tick(base_model_sensor, instance, json.dumps(state), tiny_settings)
    assert [r.partition_key for r in requests] == [key] and requests[0].tags[TRIGGER_TAG] == "base_model"


def test_runtime_sensor_compares_with_the_fingerprint_of_the_latest_audit(instance):
    assert tick(runtime_sensor, instance)[0] == []  # no audit yet
    audited(instance, "tiny", TINY_RECIPE, DATA_FREE)
    older = json.loads(json.dumps(runtime_fingerprint()))
    older["libraries"]["torch"] = "2.12.0"
    instance.report_runless_asset_event(
        dg.AssetMaterialization("runtime_environment", metadata={"fingerprint": dg.MetadataValue.json(older)})
    )
    requests, _, cursor = tick(runtime_sensor, instance)
    assert [r.partition_key for r in requests] == ["tiny"]
    assert sorted(requests[0].tags[CANDIDATES_TAG].split(",")) == sorted(
        [candidate_key(TINY_RECIPE), "torchao-int8-weight"]
    )
    assert requests[0].tags[TRIGGER_TAG] == "runtime"
    assert requests[0].tags[FROM_TAG] == fingerprint_hash(older)[:16]
    assert "libraries.torch: 2.12.0 -> " in requests[0].tags["quant_pipeline/changes"]
    assert tick(runtime_sensor, instance, cursor)[0] == []  # same change: one run only

    instance.report_runless_asset_event(
        dg.AssetMaterialization(
            "runtime_environment", metadata={"fingerprint": dg.MetadataValue.json(runtime_fingerprint())}
        )
    )
    requests, skip, _ = tick(runtime_sensor, instance, cursor)
    assert requests == [] and "unchanged" in skip


def test_sensor_cursor_survives_a_new_instance_on_the_same_storage(
    tiny_settings, mlflow_tracker, calibration_copy, tmp_path
):
    """After an audit, a fresh instance on the same storage (a daemon restart) sees no change to act on."""
    home = tmp_path / "home"
    home.mkdir()
    settings = replace(tiny_settings, calibration_file=str(calibration_copy))
    with dg.instance_for_test(temp_dir=str(home)) as first:
        audited(first, settings.model, settings.recipe)
        first.report_runless_asset_event(
            dg.AssetMaterialization("calibration_set", metadata={"version": "calibration.jsonl@0000000000000000"})
        )
        requests, _, cursor = tick(calibration_data_sensor, first, None, settings, mlflow_tracker)
        assert len(requests) == 1
    with dg.instance_for_test(temp_dir=str(home)) as second:
        assert second.get_latest_materialization_event(dg.AssetKey("calibration_set")) is not None
        requests, skip, _ = tick(calibration_data_sensor, second, cursor, settings, mlflow_tracker)
        assert requests == [] and "unchanged" in skip


def test_after_the_model_stages_succeed_each_candidate_then_the_comparison_is_requested(
    tiny_settings, mlflow_tracker, instance, calibration_copy, lenient_policy
):
    """The chain the daemon follows: the run a trigger requested (the model's stages) succeeds, and the next
    sensor requests every candidate it names, then the comparison, each tagged with what changed."""
    settings = replace(tiny_settings, calibration_file=str(calibration_copy), policy_file=str(lenient_policy))
    assert run_audit(settings, mlflow_tracker, instance).success
    edit_first_sample(calibration_copy, "A calibration sample about tide tables and harbour pilots.")
    requests, _, _ = tick(
        calibration_data_sensor, instance, json.dumps({"version": "calibration.jsonl@0"}), settings, mlflow_tracker
    )
    (request,) = requests
    model_run = dg.materialize(
        [*AUDIT_ASSETS, *AUDIT_CHECKS], resources={"settings": settings, "mlflow": mlflow_tracker}, instance=instance,
        selection=request.asset_selection, partition_key=request.partition_key, tags=request.tags,
    )  # fmt: skip
    assert model_run.success
    (success,) = instance.all_logs(model_run.run_id, of_type=dg.DagsterEventType.RUN_SUCCESS)
    ctx = dg.build_run_status_sensor_context(
        sensor_name=next_phases_sensor.name, dagster_event=success.dagster_event, dagster_instance=instance,
        dagster_run=model_run.dagster_run,
    )  # fmt: skip
    follow = next_phases_sensor(ctx)
    assert [r.job_name for r in follow] == ["candidate_stages", "comparison"]
    candidate, comparison = follow
    assert candidate.partition_key.keys_by_dimension == {
        "model": request.partition_key,
        "candidate": candidate_key(settings.recipe),
    }
    assert comparison.partition_key == request.partition_key
    assert {k.to_user_string() for k in candidate.asset_selection} == set(CANDIDATE_STAGES)
    assert (
        candidate.tags[TRIGGER_TAG] == "calibration" and candidate.tags["quant_pipeline/after_run"] == model_run.run_id
    )
    # the model run's process tags stay behind: run in parallel, a later run would take these for a dead process's
    assert model_run.dagster_run.tags.get(PID_TAG) or instance.get_run_by_id(model_run.run_id).tags.get(PID_TAG)
    assert all(PID_TAG not in r.tags and HOST_TAG not in r.tags for r in follow)


def test_calibration_reaudit_reuses_base_eval_and_starts_a_new_pending_approval(
    tiny_settings, mlflow_tracker, instance, calibration_copy, tmp_path
):
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(LENIENT)
    settings = replace(tiny_settings, calibration_file=str(calibration_copy), policy_file=str(lenient))
    first = run_audit(settings, mlflow_tracker, instance, approver="Grace Hopper", note="first release")
    assert first.success
    old = first.output_for_node("quantized_artifact")
    assert mlflow_tracker.alias_version(old["model_name"], APPROVED_ALIAS) == old["registry_version"]

    lines = calibration_copy.read_text().splitlines()
    calibration_copy.write_text("\n".join(reversed(lines)) + "\n")  # same texts, other order: other samples used
    second = run_audit(settings, mlflow_tracker, instance, selection=CALIBRATION_STAGES)
    assert second.success
    ran = {e.asset_key.to_user_string() for e in second.get_asset_materialization_events()}
    assert ran == set(CALIBRATION_STAGES)  # base model's eval not re-run
    assert len(second.run_ids) == 3  # the model's stages, the candidate's, the comparison
    new = second.output_for_node("quantized_artifact")
    assert new["artifact_id"] != old["artifact_id"] and not new["reused"]
    assert second.output_for_node("quantized_eval_results")["reused_from_run"] is None
    assert second.output_for_node("approval")["decision"] == PENDING
    assert mlflow_tracker.alias_version(old["model_name"], APPROVED_ALIAS) == old["registry_version"]


def test_policy_change_rejudges_without_rerunning_any_model(tiny_settings, mlflow_tracker, instance, tmp_path):
    lenient = tmp_path / "lenient.yaml"
    lenient.write_text(LENIENT)
    settings = replace(tiny_settings, policy_file=str(lenient))
    first = run_audit(settings, mlflow_tracker, instance)
    assert first.success
    model_name = first.output_for_node("quantized_artifact")["model_name"]
    change_policy(settings, mlflow_tracker, model_name, LENIENT.replace("lenient", "lenient-v2").replace("1.0", "0.9"))
    # Compared before the re-judging, the candidate's verdict answers the old policy: STALE, never recommended.
    stale = run_audit(settings, mlflow_tracker, instance, selection=["candidate_tradeoff"]).output_for_node(
        "candidate_tradeoff"
    )
    assert set(stale["verdicts"].values()) == {"STALE"} and stale["recommended"] is None
    rejudge = run_audit(settings, mlflow_tracker, instance, selection=["delta_report", "approval"])
    assert rejudge.success
    assert {e.asset_key.to_user_string() for e in rejudge.get_asset_materialization_events()} == {
        "delta_report",
        "approval",
    }
    assert rejudge.output_for_node("delta_report")["policy_name"] == "lenient-v2"
    after = run_audit(settings, mlflow_tracker, instance, selection=["candidate_tradeoff"]).output_for_node(
        "candidate_tradeoff"
    )
    assert "STALE" not in after["verdicts"].values() and set(after["verdicts"]) == set(stale["verdicts"])
    # A full run after the policy change reuses the artifact and both evaluations by hash.
    full = run_audit(settings, mlflow_tracker, instance)
    assert full.output_for_node("quantized_artifact")["reused"]
    assert full.output_for_node("base_eval_results")["reused_from_run"] == first.run_ids[0]  # the model's run
    assert full.output_for_node("quantized_eval_results")["reused_from_run"] == first.run_id  # the candidate's
