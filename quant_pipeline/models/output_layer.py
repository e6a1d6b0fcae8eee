"""The base model's output layer alone, read from its checkpoint: all a quantized evaluation needs of the base.

Agreement with the base is computed from the base's stored final hidden states through its output layer
(`evaluation.generation.agreement_with_reference`), so every quantized evaluation needs that one layer, not the
model: 540 MB to allocate and fill for the default model, 0.35-0.65 s in a warm process against 0.05 s for the
layer (a fresh process pays the imports either way). The layer's name is read off the model built on
the meta device (no weights, no memory), its weight from the safetensors file that holds it, or from the input
embedding it is tied to (a tied checkpoint stores the tensor once). The layer computes what the loaded model's
would: the same weight, cast to the placement's dtype as `load_model` casts the model.
"""

from __future__ import annotations

import json
from pathlib import Path

from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.placement import CPU, Placement


def load_output_layer(path: Path, trust_remote_code: bool = False, where: Placement = CPU):
    """The checkpoint's output layer as a `torch.nn.Linear` on ``where``; a checkpoint this cannot read it from
    (one saved quantized, a layer of another kind) gets it from the whole model, loaded as `load_model` does."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    weight = bias = None
    if getattr(config, "quantization_config", None) is None:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        head = model.get_output_embeddings()
        if type(head) is torch.nn.Linear:
            name = next(n for n, m in model.named_modules() if m is head)
            tied = getattr(model, "_tied_weights_keys", None)
            tied = tied if isinstance(tied, dict) and config.get_text_config().tie_word_embeddings else {}
            weight = _tensor(path, f"{name}.weight")
            if weight is None and f"{name}.weight" in tied:
                weight = _tensor(path, tied[f"{name}.weight"])
            bias = _tensor(path, f"{name}.bias") if head.bias is not None else None
            if head.bias is not None and bias is None:
                weight = None
    if weight is None:
        return load_model(path, trust_remote_code, where)[0].get_output_embeddings()
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = torch.nn.Parameter(weight.to(where.device, where.torch_dtype), requires_grad=False)
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.to(where.device, where.torch_dtype), requires_grad=False)
    return layer.eval()


def _tensor(path: Path, key: str):
    """One tensor of a safetensors checkpoint (single file, or sharded with its index); None where it has none."""
    from safetensors import safe_open

    index = path / "model.safetensors.index.json"
    if index.exists():
        file = json.loads(index.read_text()).get("weight_map", {}).get(key)
        if file is None:
            return None
        source = path / file
    else:
        source = path / "model.safetensors"
    if not source.exists():
        return None
    with safe_open(source, framework="pt") as f:
        return f.get_tensor(key) if key in f.keys() else None
