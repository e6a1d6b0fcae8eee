"""HQQ (half-quadratic quantization, the `hqq` package): data-free, on CPU through HQQ's PyTorch backend.

transformers 5.24 declares HQQ (`HqqConfig`) but cannot apply it: `from_pretrained(..., quantization_config=
HqqConfig(...))` raises `NotImplementedError: QuantizationMethod.HQQ is not available yet and will be supported
soon.`, and it cannot restore an HQQ checkpoint either (it loads everything else and leaves each quantized layer
randomly initialised, with only a load report listing them as missing). So here the linear layers of the blocks are
quantized with HQQ's own `HQQLinear` (a scale and a zero point per group along the input axis, refined from the
min-max ones by HQQ's half-quadratic solver; the codes packed), and saved by transformers' `save_pretrained` as
safetensors: HQQ writes each layer's state as plain tensors (packed codes `W_q`, `scale`, `zero`, and its settings
nbits, group_size, axis, packing, compute dtype, each a small tensor), no pickle. The file is `model.hqq.safetensors`,
so a plain `from_pretrained` stops (no `model.safetensors`) instead of loading random layers; config.json names the
method in transformers' own form (`quant_method: hqq`, `quant_config`, `skip_modules`: the kept layer types).
`load` reloads it (`checkpoint.load_model` calls it): transformers builds the model from its config, HQQ restores
each quantized layer from its tensors, every other tensor loads as usual, and a tensor left unloaded or unread is
an error. HQQ turns two of those tensors (the compute and unpack dtypes) into a dtype with `eval`: `load` accepts
only the dtype names HQQ itself writes, before HQQ reads them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.errors import AuditInputError

if TYPE_CHECKING:  # checkpoint loading imports this module: it stays light (no dagster, no torch)
    from quant_pipeline.core.recipe import Recipe

AXIS = 1  # groups run along the input features (HQQ's and transformers' default; its fast backends need it)
# Not `model.safetensors`: a plain `from_pretrained` (which cannot restore HQQ layers) would load the rest and leave
# every quantized layer randomly initialised, with only a load report to say so; without the file it stops.
WEIGHTS = "model.hqq.safetensors"
# The dtype names HQQ may store and then eval: its compute dtypes and its packings' unpack dtypes.
SAFE_DTYPES = frozenset({"torch.float32", "torch.float16", "torch.bfloat16", "torch.uint8", "torch.int32"})


def is_checkpoint(path: Path) -> bool:
    """Whether the checkpoint at `path` is an HQQ one (its config.json says so)."""
    config = json.loads((Path(path) / "config.json").read_text())
    return (config.get("quantization_config") or {}).get("quant_method") == "hqq"


def _linear_tag(name: str) -> str:
    """transformers' HQQ name for a layer type (`model.layers.3.self_attn.v_proj` -> `self_attn.v_proj`)."""
    return ".".join(n for n in name.split(".") if n not in ("model", "layers") and not n.isnumeric())


def quantize(base_path: Path, texts: list[str], recipe: Recipe, out_dir: Path) -> dict:
    """Every linear layer of the blocks but the kept types as `HQQLinear` (the tied output layer stays as it is),
    saved as safetensors; the layer types' sensitivity is measured first, on the same fp32 model (one load)."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear
    from transformers import AutoModelForCausalLM, AutoTokenizer, HqqConfig

    from quant_pipeline.models.sensitivity import layer_type_sensitivity

    tokenizer = AutoTokenizer.from_pretrained(base_path)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32, use_safetensors=True)
    sensitivity = layer_type_sensitivity(model, tokenizer, texts, recipe) if texts else {}
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    group = None if recipe.group_size == -1 else recipe.group_size  # None: one group per row (per channel)
    config = BaseQuantizeConfig(nbits=recipe.bits, group_size=group, axis=AXIS)
    kept = set(recipe.keep.split(".")) if recipe.keep else set()
    decoder_prefix = next(n for n, m in model.named_modules() if m is model.get_decoder())
    skipped = {"lm_head"}
    for name, module in list(model.get_decoder().named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        if name.rsplit(".", 1)[-1] in kept:
            skipped.add(_linear_tag(f"{decoder_prefix}.{name}"))
            continue
        parent, child = name.rsplit(".", 1)
        layer = HQQLinear(module, config, compute_dtype=torch.float32, device="cpu")
        setattr(model.get_decoder().get_submodule(parent), child, layer)
    model.config.quantization_config = HqqConfig(
        nbits=recipe.bits, group_size=group, axis=AXIS, skip_modules=sorted(skipped)
    ).to_dict()
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="1000GB")  # one file
    (out_dir / "model.safetensors").rename(out_dir / WEIGHTS)
    tokenizer.save_pretrained(out_dir)
    return {"layer_sensitivity": sensitivity}


def _decoded(tensor) -> str:
    return "".join(chr(int(i)) for i in tensor.reshape(-1))


def load(path: Path, device: str = "cpu"):
    """The HQQ checkpoint at `path` as a model: the base architecture from its config, each quantized layer an
    `HQQLinear` restored from its tensors (computing in the dtype it was saved with), everything else as saved."""
    import torch
    from hqq.core.quantize import HQQBackend, HQQLinear
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # the plain architecture: its layers are swapped below
    state: dict = load_file(path / WEIGHTS)
    for key, value in state.items():
        if key.endswith((".compute_dtype", ".unpack_view_dtype")) and _decoded(value) not in SAFE_DTYPES:
            raise AuditInputError(f"{path}: {key} is {_decoded(value)[:40]!r}, not a dtype HQQ writes: refused")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    HQQLinear.set_backend(HQQBackend.PYTORCH)
    quantized = sorted(k.removesuffix(".W_q") for k in state if k.endswith(".W_q"))
    if not quantized:
        raise AuditInputError(f"{path}: config.json says HQQ, but no layer holds HQQ's codes (W_q)")
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    for name in quantized:
        if name not in linears:
            raise AuditInputError(f"{path}: {name} holds HQQ codes but is not a linear layer of the architecture")
        stored = state.get(f"{name}.compute_dtype")  # absent: reported as missing below
        dtype = torch.float32 if stored is None else getattr(torch, _decoded(stored).removeprefix("torch."))
        parent, child = name.rsplit(".", 1)
        layer = HQQLinear(None, None, compute_dtype=dtype, device=device, initialize=False)
        setattr(model.get_submodule(parent), child, layer)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # a tied parameter is saved once (the output layer is the embedding): it is loaded with the one it shares
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in state if k in params}
    missing = [k for k in missing if not (k in params and id(params[k]) in loaded)]
    not_ready = [n for n in quantized if not model.get_submodule(n).ready]
    if missing or unexpected or not_ready:
        raise AuditInputError(
            f"{path}: the HQQ checkpoint does not fit its architecture: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, layers not restored {not_ready[:5]}"
        )
    return model.to(device)
