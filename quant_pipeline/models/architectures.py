"""What the pipeline needs to know about a model's architecture, read from the model itself, in one place.

Config field names differ by architecture (GPT-2's `n_embd`/`n_inner` are Llama's `hidden_size`/
`intermediate_size`, Phi-3 fuses q/k/v into one layer, Gemma's head soft-caps its logits), so nothing here
reads a width or a layer name from a config key: the model is built on the meta device (shapes only, no
memory, no weights) and its layers are read off it. Which method can quantize which layer type, and whether
the logits are the output layer of the last hidden state, follow from what is found.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import LAYER_TYPES

# Methods that quantize `torch.nn.Linear` layers only: torchao's `quantize_` filter and HQQ's layer swap. A
# block made of transformers' `Conv1D` (GPT-2) would come out of them unquantized, under a quantized name.
LINEAR_ONLY_METHODS = frozenset({"torchao-int8-weight", "torchao-int8-dynamic", "torchao-int4-weight", "hqq"})


@dataclass(frozen=True)
class Architecture:
    """One architecture as the pipeline sees it.

    `input_widths`: every quantizable layer type (a module name with its block and expert indices as `*`) and
    the input features it reads, which group sizes must divide; `conv1d`: those stored as transformers'
    `Conv1D` (input width is `weight.shape[0]`), which linear-only methods leave alone; `hidden_size`: the
    width of the residual stream (what the output layer reads, whatever the config calls it); `fused_experts`:
    mixture-of-experts weights stored as one 3-D tensor per block (transformers 5's Mixtral, Qwen2-MoE), which
    no method here quantizes, since each quantizes layers, not tensors; `llama_block`: its blocks hold exactly
    Llama's seven projections (what `keep` names and GPTQ's shared-input passes group); `logit_softcap`: c
    where logits = c * tanh(head(hidden) / c) (Gemma 2, Gemma 3 when set), else None."""

    model_type: str
    input_widths: dict[str, int]
    conv1d: frozenset[str]
    hidden_size: int
    fused_experts: frozenset[str]
    llama_block: bool
    logit_softcap: float | None


def _layer_type(name: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def describe(config: dict, model_label: str) -> Architecture:
    """The architecture of a model config (the dict of its config.json), from a meta-device instantiation."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    fields = {k: v for k, v in config.items() if k != "quantization_config"}
    model_type = fields.pop("model_type", None)
    try:
        model_config = AutoConfig.for_model(model_type, **fields)
    except ValueError:  # the methods load through transformers' own classes: remote code is not quantized
        raise AuditInputError(
            f"{model_label}'s model_type {model_type!r} is not an architecture transformers {transformers.__version__} "
            "builds: quantize a model of one of transformers' own architectures"
        ) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    head = model.get_output_embeddings()
    widths: dict[str, int] = {}
    conv1d: set[str] = set()
    for name, module in model.named_modules():
        if module is head or not isinstance(module, torch.nn.Linear | Conv1D):
            continue
        layer = _layer_type(name)
        if isinstance(module, Conv1D):
            conv1d.add(layer)
            widths[layer] = module.weight.shape[0]  # Conv1D stores its weight as (in, out)
        else:
            widths[layer] = module.in_features
    blocks = {name.rsplit(".", 1)[-1] for name in widths}
    experts = frozenset(_layer_type(name) for name, p in model.named_parameters() if p.dim() == 3)
    return Architecture(
        model_type=model_config.model_type,
        input_widths=widths,
        conv1d=frozenset(conv1d),
        hidden_size=head.in_features,
        fused_experts=experts,
        llama_block=blocks == set(LAYER_TYPES),
        logit_softcap=logit_softcap(model_config),
    )


def logit_softcap(model_config) -> float | None:
    """The soft-cap c of the model's final logits (`final_logit_softcapping`), or None where there is none."""
    return getattr(model_config.get_text_config(), "final_logit_softcapping", None) or None


def unsupported_reason(arch: Architecture, method: str) -> str | None:
    """Why `method` cannot quantize this architecture (one clause naming what to use instead), or None."""
    if method != "identity" and arch.fused_experts:
        return (
            f"{arch.model_type}'s experts are 3-D tensors ({', '.join(sorted(arch.fused_experts))}), not layers, and "
            "every method quantizes layers: the experts, most of the weights, would stay fp32; audit a dense model"
        )
    if method in LINEAR_ONLY_METHODS and arch.conv1d:
        return (
            f"{method} quantizes torch.nn.Linear layers only and {arch.model_type}'s blocks are transformers' "
            f"Conv1D ({', '.join(sorted(arch.conv1d))}), so it would quantize nothing; use gptq, bnb-int8 or bnb-nf4"
        )
    return None
