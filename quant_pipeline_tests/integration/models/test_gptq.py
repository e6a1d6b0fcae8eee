"""GPTQ on a real tiny Llama: grouping layers that share an input gives byte-identical weights, and the int4 layers
compute the library's bits without its identity gather."""

import json

import pytest
import torch

from quant_pipeline.core.hashing import file_hashes
from quant_pipeline.core.paths import DEFAULT_CALIBRATION
from quant_pipeline.core.progress import log_progress
from quant_pipeline.evaluation.generation import generate_greedy
from quant_pipeline.models import gptq
from quant_pipeline.models.calibration import load_calibration_texts
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline_tests.support import TINY_RECIPE


def test_grouping_layers_that_share_an_input_quantizes_to_the_same_bytes(tiny_llama, tmp_path, monkeypatch):
    """q/k/v (and gate/up) read one input, so one calibration pass per group gives each the same
    Hessian as a pass per layer, and a group's pass may stop once its layers have their inputs:
    the packed weights must be identical, only faster to produce."""
    texts = load_calibration_texts(DEFAULT_CALIBRATION)
    assert gptq.block_groups(tiny_llama) == gptq.LLAMA_BLOCK_GROUPS
    lines: list[str] = []
    with log_progress(lines.append):
        grouped_passes = gptq.quantize(tiny_llama, texts, TINY_RECIPE, tmp_path / "grouped")
    assert len(lines) == 1 and lines[0].startswith("GPTQ blocks: 2/2 blocks in ")  # the run log's progress line
    monkeypatch.setattr(gptq, "block_groups", lambda path, keep="": None)  # one full pass per linear layer
    per_layer_passes = gptq.quantize(tiny_llama, texts, TINY_RECIPE, tmp_path / "per_layer")
    # every sample's q/k/v, o and gate/up passes stop early in both blocks; only down's runs in full
    sensitivity = grouped_passes.pop("layer_sensitivity")  # measured on the base before GPTQ: the same both ways
    assert sensitivity == per_layer_passes.pop("layer_sensitivity") and len(sensitivity) == 7
    assert grouped_passes == {"calibration_passes_cut_short": 2 * TINY_RECIPE.calibration_samples * 3}
    assert per_layer_passes == {"calibration_passes_cut_short": 0}
    grouped = json.loads((tmp_path / "grouped" / "config.json").read_text())["quantization_config"]
    assert grouped["modules_in_block_to_quantize"] == gptq.LLAMA_BLOCK_GROUPS
    assert (
        file_hashes(tmp_path / "grouped")["model.safetensors"]
        == file_hashes(tmp_path / "per_layer")["model.safetensors"]
    )


@pytest.mark.parametrize("desc_act", [False, True], ids=["group-order", "act-order"])
def test_int4_layers_skip_only_an_identity_gather_and_compute_the_same_bits(tiny_llama, tmp_path, desc_act):
    """Loaded for evaluation and serving, a GPTQ layer skips gptqmodel's column gather when its group order is the
    identity (no act-order): logits and greedy tokens must be bit for bit what the library's own path gives. With
    act-order the order is a real permutation, and the layer keeps the library's gather."""
    texts = load_calibration_texts(DEFAULT_CALIBRATION)
    gptq.quantize(tiny_llama, texts, TINY_RECIPE.model_copy(update={"desc_act": desc_act}), tmp_path / "q")
    model, tokenizer = load_model(tmp_path / "q")
    layers = [layer for layer in model.modules() if "_fused_op_forward" in vars(layer)]
    assert len(layers) == 2 * 7  # every projection of both blocks
    prompts = ["What is the capital of France?", "Write a haiku about rain.", "2 + 2 ="]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        skipped = model(**batch).logits
        tokens = [row["output_ids"] for row in generate_greedy(model, tokenizer, prompts, [12, 12, 12])]
    assert {layer._gather_is_identity for layer in layers} == {not desc_act}
    for layer in layers:
        del layer._fused_op_forward  # the library's own method again
    with torch.inference_mode():
        assert torch.equal(model(**batch).logits, skipped)
        assert [row["output_ids"] for row in generate_greedy(model, tokenizer, prompts, [12, 12, 12])] == tokens
