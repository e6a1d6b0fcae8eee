"""Every quantization method audited end to end on the tiny model, each under its own ID, beside one base eval;
the identity candidate (the base, copied) comes out with every quality delta exactly zero."""

import json
import shutil
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest

from quant_pipeline.core.paths import DEFAULT_CALIBRATION
from quant_pipeline.core.recipe import METHOD_FIELDS
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.release.registry import write_bom
from quant_pipeline_tests.support import LENIENT, TINY_RECIPE, audit_world, replace, run_audit


@pytest.fixture(scope="module")
def audited_methods(tmp_path_factory, tiny_llama):
    """One store, one base evaluation, one audit per method (the base's work is reused by key)."""
    root = tmp_path_factory.mktemp("methods")
    (root / "policy.yaml").write_text(LENIENT)
    shutil.copy(DEFAULT_CALIBRATION, root / "calibration.jsonl")
    settings, tracker = audit_world(root, tiny_llama)
    (root / "dagster").mkdir()
    results = {}
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        for method in METHOD_FIELDS:
            run = run_audit(
                replace(settings, recipe=TINY_RECIPE.model_copy(update={"method": method})), tracker, instance
            )
            assert run.success, method
            results[method] = {
                "artifact": run.output_for_node("quantized_artifact"),
                "base_eval": run.output_for_node("base_eval_results"),
                "report": run.output_for_node("delta_report"),
            }
    return settings, results


def test_every_method_is_audited_under_its_own_id_with_one_shared_base_evaluation(audited_methods):
    _, results = audited_methods
    ids = {m: r["artifact"]["artifact_id"] for m, r in results.items()}
    assert len(set(ids.values())) == len(METHOD_FIELDS)
    assert ids["gptq"].startswith("gptq-w4g64-") and ids["identity"].startswith("identity-")
    assert len({r["base_eval"]["key"] for r in results.values()}) == 1
    for method, r in results.items():
        assert r["artifact"]["recipe"]["method"] == method
        assert r["report"]["verdict"] in ("PASS", "FAIL", "INCOMPLETE")


@pytest.mark.parametrize("method", sorted(METHOD_FIELDS))
def test_each_artifact_is_safetensors_that_transformers_reloads(audited_methods, method):
    _, results = audited_methods
    path = Path(results[method]["artifact"]["path"])
    assert not [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert (path / "model.safetensors").exists()
    model, _ = load_model(path)
    kernels = {type(getattr(m, "weight", None)).__name__ for m in model.modules() if hasattr(m, "weight")}
    if method.startswith("torchao"):
        assert kernels & {"Int8Tensor", "IntxUnpackedToInt8Tensor"}, kernels


def test_the_identity_candidate_moves_no_quality_metric_at_all(audited_methods):
    _, results = audited_methods
    report = Path(results["identity"]["report"]["path"])
    deltas = pd.read_parquet(report.with_name("delta_report.parquet"))
    quality = deltas[deltas["category"] != "cost"].dropna(subset=["delta"])
    assert len(quality) > 40 and {"top1_agreement", "kl_divergence", "acc"} <= set(quality["metric"])
    assert (quality["delta"] == 0).all(), quality[quality["delta"] != 0][["category", "metric", "delta"]]
    assert (quality["base"] == quality["quantized"]).all()


def test_a_data_free_candidate_names_no_calibration_set_in_its_record_or_ml_bom(audited_methods):
    settings, results = audited_methods
    artifact = results["torchao-int8-weight"]["artifact"]
    assert artifact["calibration_hash"] is None and artifact["calibration_count"] == 0
    bom = json.loads(write_bom(settings.store, artifact["artifact_id"]).read_text())  # validated against 1.6
    assert not [c for c in bom["components"] if c["bom-ref"].startswith("calibration:")]
    gptq = json.loads(write_bom(settings.store, results["gptq"]["artifact"]["artifact_id"]).read_text())
    assert [c for c in gptq["components"] if c["bom-ref"].startswith("calibration:")]
