"""The quantization methods a candidate can be made with, behind one call: `quantize(base, texts, recipe, out)`.

Methods are not interchangeable (on SmolLM2, int8 weight-only and int8 dynamic activations lose very
differently), so each is a recipe of its own, with its own ID prefix and its own precision statement:
- gptq: gptqmodel through optimum, calibrated on the calibration set (`models/gptq.py`);
- torchao-int8-weight, torchao-int8-dynamic, torchao-int4-weight: torchao's data-free `quantize_` configs
  through transformers' `TorchAoConfig` (kept layer types through its `modules_to_not_convert`), saved as
  safetensors that transformers reloads (torchao keeps each layer's quantized data, scale and zero point as
  plain tensors, no pickle);
- bnb-int8, bnb-nf4: bitsandbytes' CPU backend through transformers' `BitsAndBytesConfig` (LLM.int8 with
  its fp16 outlier path; NF4 4-bit blocks of 64 computing in fp32), data-free, saved as safetensors (the
  scales as plain tensors); NF4 is saved before any forward pass, since bitsandbytes' first CPU forward
  repacks the weights into a layout that reloads as garbage without an error;
- hqq: HQQ's half-quadratic quantization (2/3/4/8 bits, a scale and a zero point per group), data-free, with
  HQQ's own `HQQLinear` (transformers 5.24's `HqqConfig` raises NotImplementedError), computing in fp32 on its
  PyTorch backend; saved as safetensors (codes, scales, zeros and settings as plain tensors) and reloaded by
  `models/hqq.py` (`load_model` does it: transformers builds the model, HQQ restores the layers);
- identity: the base's files copied: evaluated like any candidate, every delta must be exactly zero,
  which checks the pipeline itself.
torchao's int4 layout for CPU (`IntxWeightOnlyConfig`) stores the int4 values unpacked, one per int8: on
disk it is no smaller than int8; the tradeoff table reports the bytes as they are.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import RECORD_FILE, canonical_hash
from quant_pipeline.core.perf import bound_heap_fragmentation
from quant_pipeline.core.recipe import GROUPED_METHODS, LAYER_TYPES, Recipe
from quant_pipeline.models.architectures import describe, unsupported_reason
from quant_pipeline.models.hqq import AXIS
from quant_pipeline.models.placement import CPU, Placement
from quant_pipeline.models.sensitivity import layer_type_sensitivity

# The tensors that hold a quantized layer's scaling: gptqmodel's, torchao's, bitsandbytes' and HQQ's names for them.
SCALE_SUFFIXES = (
    ".scales", ".qzeros", "._weight_scale", "._weight_zero_point", ".SCB", ".absmax", ".quant_map", ".scale", ".zero"
)  # fmt: skip


def check_recipe_fits(recipe: Recipe, config: dict, model_label: str) -> None:
    """Refuse, before any work, a recipe the model's architecture cannot take: a method that would skip its
    layers, `keep` on a block that is not Llama's, and a group size that does not divide every quantized
    layer's input features (groups split them: GPTQ's, torchao int4's, HQQ's)."""
    recipe.validate_values()
    if recipe.method == "identity":
        return
    arch = describe(config, model_label)
    reason = unsupported_reason(arch, recipe.method)
    if reason:
        raise AuditInputError(
            f"recipe.method={recipe.method!r} cannot quantize {model_label} ({arch.model_type}): {reason}"
        )
    if recipe.keep and not arch.llama_block:
        raise AuditInputError(
            f"recipe.keep={recipe.keep!r}: keeping layer types needs a Llama-style block ({', '.join(LAYER_TYPES)}); "
            f"{model_label} is {arch.model_type!r}: drop `keep`"
        )
    if recipe.method not in GROUPED_METHODS or recipe.group_size == -1:
        return
    widths = arch.input_widths
    misfits = sorted(
        (layer for layer, width in widths.items() if width % recipe.group_size),
        key=lambda layer: widths[layer] != arch.hidden_size,  # the residual width first: the one users know
    )
    if misfits:
        fits = [g for g in (16, 32, 64, 128, 256) if all(w % g == 0 for w in widths.values())]
        hint = f"use group_size {max(fits)} (fits every layer, as do {fits})" if fits else "use group_size -1"
        width = widths[misfits[0]]
        what = f"hidden_size {width}" if width == arch.hidden_size else f"{misfits[0]} input width {width}"
        raise AuditInputError(f"recipe.group_size={recipe.group_size} does not divide {model_label}'s {what}: {hint}")


def id_prefix(recipe: Recipe) -> str:
    return {
        "gptq": f"gptq-w{recipe.bits}g{recipe.group_size}",
        "torchao-int8-weight": "torchao-int8w",
        "torchao-int8-dynamic": "torchao-int8dyn",
        "torchao-int4-weight": f"torchao-int4w-g{recipe.group_size}",
        "bnb-int8": "bnb-int8",
        "bnb-nf4": "bnb-nf4",
        "hqq": f"hqq-w{recipe.bits}g{'channel' if recipe.group_size == -1 else recipe.group_size}",
        "identity": "identity",
    }[recipe.method]


def artifact_id(
    base_hash: str,
    recipe: Recipe,
    calibration_hash: str | None,
    runtime_hash: str,
    *,
    model_name: str,
    where: Placement = CPU,
) -> str:
    """An ID derived from everything that determines the bytes: the calibration set only for a method that
    reads it (a new calibration set does not re-quantize, or re-audit, a data-free candidate).

    The registered model's name is an input too: an artifact belongs to one registered model (its record,
    trail, registry versions and sign-off name it). Without it, the same weights audited under a second name
    reused the first name's record, registered under the second, and chained the gate's verdict onto the
    first model's trail for a registry version it does not have."""
    inputs = {"base": base_hash, "recipe": recipe.as_dict(), "runtime": runtime_hash, "model": model_name}
    if recipe.calibrated:
        inputs["calibration"] = calibration_hash
    if recipe.method == "gptq" and where != CPU:  # GPTQ on a GPU makes other bytes; CPU IDs are as they were
        inputs["placement"] = where.record()
    return f"{id_prefix(recipe)}-{canonical_hash(inputs)[:12]}"


def precision(recipe: Recipe) -> str:
    """What the artifact computes in, as the record and the ML-BOM state it."""
    kept = f"; {recipe.keep.replace('.', ', ')} kept at fp32 in every block" if recipe.keep else ""
    hqq_group = "output channel" if recipe.group_size == -1 else f"group of {recipe.group_size} input features"
    return {
        "gptq": f"int{recipe.bits} weights (GPTQ, group {recipe.group_size}), fp32 activations",
        "torchao-int8-weight": "int8 weights (torchao, per output channel), fp32 activations",
        "torchao-int8-dynamic": "int8 weights (torchao, per output channel), int8 activations scaled per token",
        "torchao-int4-weight": f"int4 weights (torchao, group {recipe.group_size}, one per int8), fp32 activations",
        "bnb-int8": "int8 weights (bitsandbytes LLM.int8, per row, outliers above 6.0 in fp16), fp16 matmul inputs",
        "bnb-nf4": "NF4 weights (bitsandbytes, blocks of 64), fp32 compute",
        "hqq": f"int{recipe.bits} weights (HQQ, a scale and a zero point per {hqq_group}, axis {AXIS}, "
        "half-quadratic optimised), dequantized to fp32 compute for each matmul (HQQ's PyTorch backend), "
        "fp32 activations",
        "identity": "fp32: the base's bytes, copied (the pipeline's own check: every delta must be zero)",
    }[recipe.method] + kept


def _torchao_config(recipe: Recipe):
    import torch
    from torchao.quantization import (
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        IntxWeightOnlyConfig,
    )
    from torchao.quantization.granularity import PerGroup

    if recipe.method == "torchao-int8-weight":
        return Int8WeightOnlyConfig()
    if recipe.method == "torchao-int8-dynamic":
        return Int8DynamicActivationInt8WeightConfig()
    return IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(recipe.group_size))


def kept_modules(keep: str) -> list[str] | None:
    """transformers' `modules_to_not_convert` for the kept layer types: one pattern matching them in every
    block (matched from the start of the module name, so a bare `v_proj` would match nothing)."""
    return [rf".*\.({keep.replace('.', '|')})"] if keep else None


def _quantization_config(recipe: Recipe):
    """transformers' config for a data-free method, with the kept layer types left out."""
    import torch
    from transformers import BitsAndBytesConfig, TorchAoConfig

    # bitsandbytes' skip list replaces its default one, which leaves the (tied) output layer alone: name it too
    skip = ["lm_head", *kept_modules(recipe.keep)] if recipe.keep else None
    if recipe.method == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    if recipe.method == "bnb-nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
            llm_int8_skip_modules=skip,
        )  # fmt: skip
    return TorchAoConfig(quant_type=_torchao_config(recipe), modules_to_not_convert=kept_modules(recipe.keep))


def _data_free(base_path: Path, texts: list[str], recipe: Recipe, out_dir: Path) -> dict:
    """torchao's or bitsandbytes' quantization of every linear layer of the blocks but the kept types (the tied
    output layer stays as it is), applied as transformers loads the base, and saved before any forward pass;
    the layer types' sensitivity is measured first, on the base in fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    sensitivity = {}
    if texts:
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
        sensitivity = layer_type_sensitivity(base, tokenizer, texts, recipe)
        del base
    config = _quantization_config(recipe)
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=torch.float32, device_map="cpu", use_safetensors=True, quantization_config=config
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"layer_sensitivity": sensitivity}


def _identity(base_path: Path, out_dir: Path) -> dict:
    for path in sorted(Path(base_path).iterdir()):
        if path.is_file() and path.name != RECORD_FILE:
            shutil.copy2(path, out_dir / path.name)
    return {}


def quantize(base_path: Path, texts: list[str], recipe: Recipe, out_dir: Path, where: Placement = CPU) -> dict:
    """Make the candidate in `out_dir` (a fresh directory) with the recipe's method; returns facts for the UI.
    GPTQ runs on the audit's placement; the data-free methods and HQQ quantize on the CPU (rounding needs no
    GPU), and their artifacts load onto the placement for evaluation."""
    bound_heap_fragmentation()
    if recipe.method == "gptq":
        from quant_pipeline.models.gptq import quantize as gptq

        return gptq(base_path, texts, recipe, out_dir, where)
    if recipe.method == "identity":
        return _identity(base_path, out_dir)
    if recipe.method == "hqq":
        from quant_pipeline.models.hqq import quantize as hqq

        return hqq(base_path, texts, recipe, out_dir)
    return _data_free(base_path, texts, recipe, out_dir)


def scale_summary(artifact_dir: Path) -> dict:
    """Per-layer scale/zero-point statistics and one hash over all of them (the 'scaling parameters')."""
    from safetensors import safe_open

    layers, h = {}, hashlib.sha256()
    for st in sorted(artifact_dir.glob("*.safetensors")):
        with safe_open(st, framework="pt") as f:
            for key in sorted(f.keys()):
                if key.endswith(SCALE_SUFFIXES):
                    t = f.get_tensor(key)
                    h.update(key.encode())
                    h.update(t.contiguous().view(-1).numpy().tobytes())
                    layer, kind = key.rsplit(".", 1)
                    tf = t.float()
                    layers.setdefault(layer, {})[kind.removeprefix("_weight_")] = {
                        "mean": round(tf.mean().item(), 6),
                        "min": round(tf.min().item(), 6),
                        "max": round(tf.max().item(), 6),
                    }
    return {"hash": h.hexdigest(), "layers": len(layers), "per_layer": layers}
