"""GPTQ on a real tiny Llama: grouping layers that share an input gives byte-identical weights."""

import json

from quant_pipeline.core.hashing import file_hashes
from quant_pipeline.core.paths import DEFAULT_CALIBRATION
from quant_pipeline.core.progress import log_progress
from quant_pipeline.models import gptq
from quant_pipeline.models.calibration import load_calibration_texts
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
