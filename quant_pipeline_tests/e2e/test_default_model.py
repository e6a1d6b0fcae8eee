"""The default model end to end (SmolLM2-135M-Instruct from the shipped GGUF), at reduced sizes for CI."""

import pytest

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.models.checkpoint import resolve_model_source
from quant_pipeline_tests.support import real_model_audit

pytestmark = pytest.mark.slow


def test_default_smollm2_audit_quantizes_evaluates_and_gates(tmp_path, mlflow_tracker, instance):
    settings, result, evals = real_model_audit(
        tmp_path / "store", mlflow_tracker, instance, "default", seq_len=128, eval_limit=8, max_new_tokens=32
    )
    evaluated = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert set(evaluated) == {
        "slices_within_tolerance", "every_gated_slice_informative", "policy_metrics_measured", "identity_moves_nothing"
    }  # fmt: skip
    assert evaluated["identity_moves_nothing"] is False  # no identity candidate audited: a warning, not a pass
    assert evaluated["policy_metrics_measured"] is True
    # 8 items per slice under the shipped policy (min_items 20): never a PASS, and never approvable.
    report = result.output_for_node("delta_report")
    assert report["verdict"] in ("FAIL", "INCOMPLETE") and not evaluated["every_gated_slice_informative"]
    decision = result.output_for_node("approval")["decision"]
    assert decision == {"FAIL": "rejected by the gate", "INCOMPLETE": "incomplete: not approvable"}[report["verdict"]]

    base = result.output_for_node("base_checkpoint")
    assert base["model_name"] == resolve_model_source("default").name == "SmolLM2-135M-Instruct"
    assert base["hidden_size"] == 576 and base["num_hidden_layers"] == 30
    assert 130e6 < base["num_parameters"] < 140e6 and base["dtype"] == "F32"

    artifact = result.output_for_node("quantized_artifact")
    record = verify_artifact(settings.store, artifact["artifact_id"]).dump()
    assert record["scales"]["layers"] == 30 * 7
    assert artifact["size_bytes"] < 0.5 * base["size_bytes"]  # int4 linears + fp32 tied embedding

    base_evals, quant_evals = evals["base"], evals["quantized"]
    # A real 135M instruct model is far better than a random one on held-out text, and 4-bit GPTQ
    # costs it some perplexity but keeps it in the same range.
    assert base_evals[("heldout", "word_perplexity")] < 200
    # #12 case 9: the suite's first items are ones SmolLM2 can do, so these slices can show a regression
    assert base_evals[("json_format", "format_validity")] > 0
    assert base_evals[("tool_call", "tool_call_validity")] > 0
    assert base_evals[("should_refuse", "refusal_rate")] > 0
    assert base_evals[("arithmetic", "acc")] > 0.25
    assert 1.0 <= quant_evals[("heldout", "word_perplexity")] / base_evals[("heldout", "word_perplexity")] < 2.0
