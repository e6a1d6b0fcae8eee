"""GPTQ through transformers/optimum, backed by gptqmodel: the calibrated method (`models/methods.py` has all)."""

import json
from contextlib import contextmanager
from pathlib import Path

from quant_pipeline.core.perf import bound_heap_fragmentation, heap_for_temporaries
from quant_pipeline.core.progress import Progress
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.models.architectures import describe
from quant_pipeline.models.placement import CPU, Placement
from quant_pipeline.models.sensitivity import layer_type_sensitivity

# Linear layers that read the same input share one calibration pass: their Hessians are identical,
# so grouping them gives the same bytes as one pass per layer, with 4 block forwards instead of 7.
# Listed in the order a Llama block runs them, which is what lets a pass stop early (below).
LLAMA_BLOCK_GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def block_groups(base_path: Path, keep: str = "") -> list[list[str]] | None:
    """The shared-input grouping for Llama-style blocks (`models/architectures.py`: Llama's seven projections,
    run in Llama's order), without the layer types kept at full precision; None (one pass per layer) for
    anything else."""
    config = json.loads((Path(base_path) / "config.json").read_text())
    if not describe(config, Path(base_path).name).llama_block:
        return None
    kept = set(keep.split(".")) if keep else set()
    groups = [[name for name in group if name.rsplit(".", 1)[-1] not in kept] for group in LLAMA_BLOCK_GROUPS]
    return [group for group in groups if group]


class _GroupInputsCollected(Exception):
    """Raised inside a calibration pass once every layer being calibrated has seen its input."""


@contextmanager
def calibration_passes_stop_early(blocks, order: list[str]):
    """Stop each GPTQ calibration pass through a block once the group being calibrated has its inputs.

    optimum runs the whole block for every group (q/k/v, o, gate/up, down) only to feed the Hessian
    hooks of that group, and throws the block's output away; the rest of the forward is wasted
    (the q/k/v pass needs nothing past the first layer norm). Here a layer that runs after every
    layer under calibration (those are the ones optimum has hooked) ends the pass, and the block
    returns None for it. The pass that computes the block's output for the next block has no hooks
    and runs in full, so the Hessians, and the packed bytes, are unchanged. Yields a counter of the
    passes cut short."""
    stopped = {"passes": 0}
    handles, patched = [], []

    def stop_before(layers: dict, position: int):
        def hook(module, args):
            collecting = [i for i, name in enumerate(order) if layers[name]._forward_hooks]
            if collecting and max(collecting) < position:
                raise _GroupInputsCollected

        return hook

    def catching(forward):
        def run(*args, **kwargs):
            try:
                return forward(*args, **kwargs)
            except _GroupInputsCollected:
                stopped["passes"] += 1
                return None

        return run

    try:
        for block in blocks:
            layers = {name: block.get_submodule(name) for name in order}
            for position, name in enumerate(order):
                handles.append(layers[name].register_forward_pre_hook(stop_before(layers, position)))
            block.forward = catching(block.forward)
            patched.append(block)
        yield stopped
    finally:
        for handle in handles:
            handle.remove()
        for block in patched:
            del block.forward  # back to the class's forward


@contextmanager
def blocks_progress(blocks):
    """A progress line per GPTQ block reached (optimum quantizes the blocks in order, each one's first
    forward marks its start); optimum draws its own bar on the terminal, so only the run log gets these."""
    progress = Progress("GPTQ blocks", len(blocks), "blocks", bar=False)
    started: set[int] = set()

    def first_call(index: int):
        def hook(module, args):
            if index not in started:
                started.add(index)
                progress.advance(1)

        return hook

    handles = [block.register_forward_pre_hook(first_call(i)) for i, block in enumerate(blocks)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        progress.close()


def quantize(base_path: Path, texts: list[str], recipe: Recipe, out_dir: Path, where: Placement = CPU) -> dict:
    """Run GPTQ on the audit's placement (CPU in float32, a GPU in float16) and save the packed model with its
    tokenizer.

    Calls optimum's GPTQQuantizer (gptqmodel underneath) the way transformers' GPTQ integration
    does, so that the calibration passes can stop early; returns how many passes were cut short and the
    layer types' sensitivity (`models.sensitivity`)."""
    import torch
    from optimum.gptq import GPTQQuantizer
    from optimum.gptq.utils import get_block_name_with_pattern
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    bound_heap_fragmentation()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    groups = block_groups(base_path, recipe.keep)  # kept layer types stay nn.Linear, and reload so
    config = GPTQConfig(
        bits=recipe.bits,
        group_size=recipe.group_size,
        desc_act=recipe.desc_act,
        sym=recipe.sym,
        damp_percent=recipe.damp_percent,
        dataset=texts[: recipe.calibration_samples],
        tokenizer=tokenizer,
        model_seqlen=recipe.seq_len,
        modules_in_block_to_quantize=groups,
    )
    # the calibration passes and the Hessians allocate and free the same blocks sample after sample, and keep
    # nothing between them: from the heap, not a fresh mapping each (core.perf). Default model, 2 threads, one
    # process, two pairs of runs: 150.4 -> 118.0 s and 136.3 -> 128.1 s, the same packed bytes (sha256); peak
    # RSS 1.75-1.79 -> 1.99-2.27 GB (the stage's own metadata; no metric of the model)
    with heap_for_temporaries():
        model = AutoModelForCausalLM.from_pretrained(
            base_path, device_map=where.device, dtype=where.torch_dtype, use_safetensors=True
        )
        # measured on every GPTQ candidate, before its weights change, so a failing one already says what the
        # accuracy-aware search would keep at full precision first
        sensitivity = layer_type_sensitivity(model, tokenizer, texts, recipe)
        quantizer = GPTQQuantizer.from_dict(config.to_dict_optimum())
        order = [name for group in groups for name in group] if groups else []
        blocks = model.get_submodule(get_block_name_with_pattern(model))  # GPT-2's `transformer.h`, Llama's `layers`
        with calibration_passes_stop_early(blocks if groups else [], order) as stopped, blocks_progress(blocks):
            quantizer.quantize_model(model, tokenizer)
    model.config.quantization_config = GPTQConfig.from_dict(quantizer.to_dict())
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"calibration_passes_cut_short": stopped["passes"], "layer_sensitivity": sensitivity}


def skip_identity_gather(model) -> None:
    """Let a GPTQ model's int4 layers on the CPU skip a copy that changes nothing.

    gptqmodel's CPU kernel (`TorchAtenLinear`) gathers each input's columns into its group order before the int4
    matmul (`x[:, ret_idx]`). Without act-order that order is the identity, so the gather only copies the input:
    12% of a prefill of the default model (32 prompts, 1 thread, torch profiler), 5% of a decode step, and a fresh
    mapping per copy under the heap bound (core.perf). A layer skips it only where its order is the identity, and
    then hands the kernel the same bf16 values in the same layout, so every output is bit for bit the library's
    (pinned by a test against the library's own method); any other order keeps the library's path."""
    import types

    from gptqmodel.nn_modules.qlinear.torch_aten_kernel import TorchAtenLinear

    for layer in model.modules():
        if type(layer) is TorchAtenLinear:
            layer._fused_op_forward = types.MethodType(_int4_mm_in_group_order, layer)


def _int4_mm_in_group_order(layer, x):
    import torch

    if getattr(layer, "_gather_is_identity", None) is None:  # `ret_idx` exists once the layer has packed for the CPU
        order = layer.ret_idx
        layer._gather_is_identity = torch.equal(order, torch.arange(order.numel(), dtype=order.dtype))
    if not layer._gather_is_identity:
        return type(layer)._fused_op_forward(layer, x)
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(torch.bfloat16).contiguous(), layer.qweight, layer.group_size, layer.scales_and_zeros
    )
    return out.to(x.dtype)
