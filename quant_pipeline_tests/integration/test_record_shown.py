"""What a reviewer sees in Dagster and an analyst in MLflow after a failed audit (#16): a real tiny-model audit,
real Dagster, real MLflow, no mocks.

Dagster: the failed check names each failing slice with its numbers and the report it judged, the
not-measurable slices with their reason, every stage its wall time and peak memory, the artifact its folder in
the store. MLflow: one parent run per audit with a nested run per stage spanning the stage's real duration,
the experiment opened in the model-training view, described registry entries, delta metrics without float noise.
"""

import dagster as dg
import pytest

from quant_pipeline.cli.audit import run_audit as cli_run_audit
from quant_pipeline.core.tracking import (
    AUDIT_KEY_TAG,
    EXPERIMENT_KIND_TAG,
    LATEST_AUDITED_ALIAS,
    MODEL_TRAINING_KIND,
)
from quant_pipeline.evaluation.delta import REGRESSION
from quant_pipeline_tests.support import fresh_audit_world, run_audit

# kl_divergence cannot stay at exactly 0 after 4-bit rounding (FAIL); a random model's accuracy sits at chance,
# so acc can show no regression (not measurable)
STRICT = (
    "name: strict\nmin_items: 1\ntolerances:\n"
    "  kl_divergence: {direction: lower_is_better, mode: absolute, tolerance: 0.0}\n"
    "  acc: {direction: higher_is_better, mode: absolute, tolerance: 0.08}\n"
)
PARENT = "mlflow.parentRunId"


@pytest.fixture(scope="module")
def failed(tmp_path_factory, tiny_llama):
    """One full audit (model, candidate, comparison) under the strict policy: a FAIL."""
    root = tmp_path_factory.mktemp("failed")
    settings, tracker = fresh_audit_world(root, tiny_llama)
    (root / "policy.yaml").write_text(STRICT)
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        result = run_audit(settings, tracker, instance)
    assert result.success
    assert result.output_for_node("delta_report")["verdict"] == "FAIL"
    return settings, tracker, result


def materialized(result) -> dict[str, dict]:
    out = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        out[mat.asset_key.to_user_string()] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return out


def test_the_failed_check_shows_each_failing_slice_with_its_numbers_and_what_it_judged(failed):
    _, _, result = failed
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    check = checks["slices_within_tolerance"]
    assert not check.passed
    report = result.output_for_node("delta_report")
    rows = check.metadata["failing_rows"].value
    assert {(r["metric"], r["category"]) for r in rows} == {(f["metric"], f["category"]) for f in report["failing"]}
    assert any(r["metric"] == "kl_divergence" for r in rows)
    for r in rows:
        assert r["status"] == REGRESSION and None not in (r["base"], r["quantized"], r["delta"], r["tolerance"])
        assert r["tolerance"] == (0.0 if r["metric"] == "kl_divergence" else 0.08)
    table = check.metadata["failing"].value
    assert "| slice" in table and "tolerance" in table and "interval" in table
    assert all(f"{r['metric']}/{r['category']}" in table for r in rows)
    assert check.metadata["judged_report_key"].value == report["judged"]["report_key"]
    assert check.metadata["judged_report_sha256"].value == report["report_sha256"]
    assert check.metadata["judged_dagster_run_id"].value == report["judged"]["dagster_run_id"]
    assert check.metadata["judged_at"].value.startswith("20")

    informative = checks["every_gated_slice_informative"]
    assert not informative.passed
    named = informative.metadata["incomplete_rows"].value
    assert [n["slice"] for n in named] == [f"{n['metric']}/{n['category']}" for n in report["incomplete"]]
    assert named and all(n["slice"].startswith("acc/") and n["reason"] and n["status"] for n in named)
    assert all(n["slice"] in informative.metadata["not_measurable"].value for n in named)


def test_every_stage_reports_its_time_and_memory_and_the_artifact_its_folder(failed):
    settings, _, result = failed
    mats = materialized(result)
    for stage in (
        "base_checkpoint", "calibration_set", "runtime_environment", "base_eval_results", "quantized_artifact",
        "quantized_eval_results", "delta_report", "approval", "audit_report",
    ):  # fmt: skip
        assert mats[stage]["wall_seconds"] > 0 and mats[stage]["peak_rss_mb"] > 0, stage
    artifact = result.output_for_node("quantized_artifact")
    assert mats["quantized_artifact"]["artifact_dir"] == str(settings.store.artifact_dir(artifact["artifact_id"]))
    assert mats["base_checkpoint"]["checkpoint_dir"] == result.output_for_node("base_checkpoint")["path"]
    assert mats["delta_report"]["html_report_url"] == f"file://{mats['delta_report']['html_report']}"
    assert mats["audit_report"]["html_url"].startswith("file://")
    assert mats["delta_report"]["mlflow_run"].endswith("?workflowType=machine_learning")
    assert mats["delta_report"]["mlflow_audit_run"].startswith("http")


def test_mlflow_groups_the_stage_runs_under_one_audit_each_spanning_its_stage(failed):
    _, tracker, result = failed
    model = result.output_for_node("quantized_artifact")["model_name"]
    client = tracker.client()
    exp = client.get_experiment_by_name(f"quant_pipeline/{model}")
    assert exp.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("stage") == "audit"]
    assert len(parents) == 1  # three Dagster runs, one audit
    parent = parents[0]
    assert parent.data.tags[AUDIT_KEY_TAG] == result.run_ids[0]  # the model stages' run starts the audit
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("stage") != "audit"}
    for stage in ("base_checkpoint", "runtime_environment", "quantized_eval_results", "delta_report", "approval"):
        assert stages[stage].data.tags[PARENT] == parent.info.run_id, stage
    assert stages["audit_report"].data.tags[PARENT] == parent.info.run_id
    mats = materialized(result)
    for stage in ("base_eval_results", "quantized_eval_results", "quantized_artifact"):
        run = stages[stage].info
        assert (run.end_time - run.start_time) / 1000 >= mats[stage]["wall_seconds"] - 0.05, stage
    assert parent.info.start_time <= min(r.info.start_time for r in stages.values())
    assert parent.info.end_time >= max(r.info.end_time for r in stages.values() if r.info.end_time)

    deltas = {k: v for k, v in stages["delta_report"].data.metrics.items() if k.startswith("delta/")}
    assert deltas and all(v == float(f"{v:.6g}") for v in deltas.values())  # no float noise past 6 digits


def test_the_registry_describes_the_model_and_its_versions_and_names_the_audited_one(failed):
    _, tracker, result = failed
    artifact = result.output_for_node("quantized_artifact")
    model, aid = artifact["model_name"], artifact["artifact_id"]
    client = tracker.client()
    assert "quantized candidate" in client.get_registered_model(model).description
    version = client.get_model_version(model, artifact["registry_version"])
    what, judged = version.description.split("\n\n")
    assert aid in what and "Quantized candidate" in what
    assert "FAIL under policy strict" in judged and "file://" in judged and "delta_report.html" in judged
    assert LATEST_AUDITED_ALIAS in version.aliases
    base = tracker.base_model_version(model)
    assert base.description.startswith("Full-precision base")


def test_the_cli_runs_each_phase_as_its_named_job(tmp_path, tiny_llama, mlflow_tracker, instance):
    (tmp_path / "cli").mkdir()
    settings, _ = fresh_audit_world(tmp_path / "cli", tiny_llama)
    overrides = {
        "model": settings.model, "store_dir": settings.store_dir, "recipe": settings.recipe,
        "policy_file": settings.policy_file, "calibration_file": settings.calibration_file,
    }  # fmt: skip
    result = cli_run_audit(
        overrides, instance=instance, tracker=mlflow_tracker, selection=["runtime_environment", "base_checkpoint"]
    )
    assert result.success
    assert [r.dagster_run.job_name for r in result.results] == ["model_stages"]
