"""The whole audit graph on a tiny real Llama: every stage runs for real and leaves its records."""

import json
from pathlib import Path

import pandas as pd

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.tracking import APPROVED_ALIAS
from quant_pipeline.defs.signoff import APPROVED, PENDING
from quant_pipeline.release.signoff import trail_path
from quant_pipeline.release.trail import read_entries
from quant_pipeline_tests.support import replace, run_audit

STAGES = [
    "base_checkpoint",
    "calibration_set",
    "runtime_environment",
    "quantized_artifact",
    "base_eval_results",
    "quantized_eval_results",
    "delta_report",
    "approval",
    "audit_report",
    "candidate_tradeoff",
]


def materialized(result) -> dict:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out[mat.asset_key.to_user_string()] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return out


def test_full_audit_records_every_stage_in_dagster_and_mlflow(tiny_settings, mlflow_tracker, instance, lenient_policy):
    settings = replace(tiny_settings, policy_file=str(lenient_policy))
    result = run_audit(settings, mlflow_tracker, instance)
    assert result.success
    mats = materialized(result)
    assert sorted(mats) == sorted(STAGES)
    for stage in (
        "base_checkpoint",
        "calibration_set",
        "quantized_artifact",
        "base_eval_results",
        "quantized_eval_results",
    ):
        assert mats[stage]["wall_seconds"] > 0 and mats[stage]["peak_rss_mb"] > 0, stage
        assert mats[stage]["mlflow_run_id"], stage

    artifact = result.output_for_node("quantized_artifact")
    record = verify_artifact(
        tiny_settings.store, artifact["artifact_id"]
    ).dump()  # files match the record written beside them
    assert record["artifact_id"] == artifact["artifact_id"] == mats["quantized_artifact"]["artifact_id"]
    assert record["recipe"]["group_size"] == 64 and record["recipe"]["bits"] == 4
    assert record["scales"]["layers"] == 14  # 2 layers x 7 linear modules, each with its scales
    assert not list(Path(artifact["path"]).parent.glob(".tmp-*"))

    evals = pd.read_parquet(result.output_for_node("quantized_eval_results")["results_path"])
    assert list(evals.columns) == ["model", "task", "category", "metric", "value", "stderr"]
    assert {"facts", "arithmetic", "reading", "non_english", "heldout"} <= set(evals["category"])

    report = mats["delta_report"]["report"]
    assert "| facts | acc |" in report and record["artifact_id"] in report

    decision = result.output_for_node("approval")
    assert decision["decision"] == PENDING and decision["approver"] is None

    client = mlflow_tracker.client()
    exp = client.get_experiment_by_name(f"quant_pipeline/{Path(settings.model).name}")
    stages = {r.data.tags["stage"] for r in client.search_runs([exp.experiment_id])}
    assert {
        "base_checkpoint",
        "calibration_set",
        "quantized_artifact",
        "base_eval_results",
        "quantized_eval_results",
        "delta_report",
        "approval",
    } <= stages
    version = client.get_model_version(record["model_name"], artifact["registry_version"])
    assert version.tags["artifact_id"] == record["artifact_id"]
    assert version.tags["content_hash"] == record["content_hash"]
    assert json.loads(version.tags["recipe"])["group_size"] == 64
    assert version.tags["approval"] == PENDING
    assert mlflow_tracker.alias_version(record["model_name"], APPROVED_ALIAS) is None


def test_named_approver_moves_the_approved_alias(tiny_settings, mlflow_tracker, instance, lenient_policy):
    settings = replace(tiny_settings, policy_file=str(lenient_policy))
    result = run_audit(
        settings, mlflow_tracker, instance, approver="Ada Lovelace", note="within tolerance on all slices"
    )
    assert result.success
    decision = result.output_for_node("approval")
    assert decision["decision"] == APPROVED and decision["approver"] == "Ada Lovelace"
    artifact = result.output_for_node("quantized_artifact")
    assert mlflow_tracker.alias_version(artifact["model_name"], APPROVED_ALIAS) == artifact["registry_version"]
    trail = read_entries(trail_path(Path(settings.store_dir), artifact["model_name"]))
    assert trail[-1]["event"] == "approved" and trail[-1]["content_hash"] == artifact["content_hash"]


def test_a_failed_gate_completes_the_run_and_records_the_rejection(tiny_settings, mlflow_tracker, instance, tmp_path):
    strict = tmp_path / "strict.yaml"  # zero KL allowed: any drift of the GPTQ model from its base fails
    strict.write_text(
        "name: impossible\nmin_items: 1\ntolerances:\n"
        "  kl_divergence: {direction: lower_is_better, mode: absolute, tolerance: 0.0}\n"
    )
    settings = replace(tiny_settings, policy_file=str(strict))
    result = run_audit(settings, mlflow_tracker, instance, approver="Ada Lovelace")
    assert result.success  # a FAIL is the audit's answer: the run completes its record
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    assert checks["slices_within_tolerance"] is False
    assert {"approval", "audit_report"} <= set(materialized(result))
    assert result.output_for_node("approval")["decision"] == "rejected by the gate"
    artifact = result.output_for_node("quantized_artifact")
    assert mlflow_tracker.alias_version(artifact["model_name"], APPROVED_ALIAS) is None
    events = [e["event"] for e in read_entries(trail_path(Path(settings.store_dir), artifact["model_name"]))]
    assert events == ["audit", "policy pinned", "evaluated", "rejected"]  # never approved


def test_same_inputs_reuse_the_artifact_and_evaluations(tiny_settings, mlflow_tracker, instance, lenient_policy):
    settings = replace(tiny_settings, policy_file=str(lenient_policy))
    first = run_audit(settings, mlflow_tracker, instance)
    second = run_audit(settings, mlflow_tracker, instance)
    assert first.success and second.success
    a, b = first.output_for_node("quantized_artifact"), second.output_for_node("quantized_artifact")
    assert a["artifact_id"] == b["artifact_id"] and b["reused"] and a["registry_version"] == b["registry_version"]
    assert second.output_for_node("base_eval_results")["reused_from_run"] == first.run_ids[0]  # the model's run
    assert second.output_for_node("quantized_eval_results")["reused_from_run"] == first.run_id  # the candidate's
