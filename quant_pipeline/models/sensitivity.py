"""Which layer types quantization hurts most on this model, measured on its calibration data: what the
accuracy-aware search keeps at full precision first.

Per linear layer, the relative output error of round-to-nearest quantization at the recipe's bits and group
size, weighted by the layer's real inputs on calibration text: ||X (W - Q(W))^T||^2 / ||X W^T||^2. One forward
pass accumulates each layer's input second moment H = X^T X, so the error is trace(E H E^T) with E = W - Q(W),
with no forward per layer; summed per layer type over the blocks. Round-to-nearest stands in for GPTQ (which
compensates rounding inside a layer, so its error is smaller): it ranks layers by how much their inputs
amplify rounding, which is what keeping a layer at full precision buys back. Each method is measured on its
own grid (`rtn_grid`): torchao's int8 and LLM.int8 per output channel; torchao's int4, NF4 and GPTQ per group;
HQQ per group, asymmetric (its half-quadratic solver refines the min-max scale and zero point round-to-nearest
starts from).
Data-free methods are measured on the calibration set too (it is text the model was not evaluated on): it
chooses what the search keeps, it never enters their bytes, and the record names the set it was measured on.
For int8 dynamic activations only the weights' share of the error is measured.
"""

from __future__ import annotations

from quant_pipeline.core.recipe import LAYER_TYPES, Recipe

SENSITIVITY_TEXTS = 16  # calibration texts in the measuring pass (of the recipe's samples)


def round_to_nearest(weight, bits: int, group_size: int, sym: bool = True):
    """`weight` quantized and dequantized per group of `group_size` input columns (-1: per output row)."""
    import torch

    rows, cols = weight.shape
    g = cols if group_size == -1 else group_size
    w = weight.reshape(rows, cols // g, g)
    if sym:
        scale = (w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)).clamp_min(1e-12)
        q = torch.clamp(torch.round(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale
    else:
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
        q = torch.clamp(torch.round((w - lo) / scale), 0, 2**bits - 1) * scale + lo
    return q.reshape(rows, cols)


def rtn_grid(recipe: Recipe) -> tuple[int, int, bool]:
    """(bits, group size, symmetric) of the round-to-nearest that stands in for the recipe's method."""
    if recipe.method.startswith("torchao-int8") or recipe.method == "bnb-int8":
        return 8, -1, True  # torchao's Int8 configs and LLM.int8: symmetric, one scale per output row
    if recipe.method == "bnb-nf4":
        return 4, 64, True  # NF4's 16 levels are not uniform: 4-bit absmax blocks of 64 stand in for them
    if recipe.method == "torchao-int4-weight":
        return 4, recipe.group_size, True
    if recipe.method == "hqq":
        return recipe.bits, recipe.group_size, False  # a scale and a zero point per group (HQQ refines them)
    return recipe.bits, recipe.group_size, recipe.sym


def layer_type_sensitivity(model, tokenizer, texts: list[str], recipe: Recipe) -> dict[str, float]:
    """Relative output error per layer type (higher: hurt more), on the first calibration texts, of the base
    model in fp32 before any weight changes (GPTQ measures the model it loaded for quantizing: one load)."""
    import torch

    layers = {
        name: module
        for name, module in model.get_decoder().named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in LAYER_TYPES
    }
    moments: dict[str, torch.Tensor] = {}
    # q, k and v read one input tensor, as gate and up do: its moment is computed once, for the first of them
    # (3 products of 7 per block fewer; the same product of the same tensor, so the same bits)
    seen: list = [None, None]  # (the last input a hook saw, its X^T X)

    def accumulate(name: str):
        def hook(module, args):
            if args[0] is not seen[0]:
                x = args[0].reshape(-1, args[0].shape[-1]).float()
                seen[:] = [args[0], x.T @ x]
            moments[name] = moments.get(name, 0) + seen[1]

        return hook

    handles = [m.register_forward_pre_hook(accumulate(n)) for n, m in layers.items()]
    try:
        with torch.inference_mode():
            for text in texts[: min(SENSITIVITY_TEXTS, recipe.calibration_samples)]:
                ids = tokenizer(text, return_tensors="pt", truncation=True, max_length=recipe.seq_len)["input_ids"]
                model.get_decoder()(input_ids=ids.to(model.device))  # the hooks are all in it: no vocabulary-wide head
    finally:
        seen.clear()
        for handle in handles:
            handle.remove()
    error, signal = dict.fromkeys(LAYER_TYPES, 0.0), dict.fromkeys(LAYER_TYPES, 0.0)
    bits, group_size, sym = rtn_grid(recipe)
    with torch.inference_mode():
        for name, module in layers.items():
            w, h = module.weight.float(), moments[name]
            e = w - round_to_nearest(w, bits, group_size, sym)
            kind = name.rsplit(".", 1)[-1]
            error[kind] += float(((e @ h) * e).sum())
            signal[kind] += float(((w @ h) * w).sum())
    return {k: round(error[k] / signal[k], 8) for k in LAYER_TYPES if signal[k] > 0}


def most_sensitive(sensitivity: dict[str, float], n: int) -> str:
    """The `keep` value of a recipe that keeps the `n` most sensitive layer types (sorted, `.`-joined)."""
    ranked = sorted(sensitivity, key=lambda k: (-sensitivity[k], k))
    return ".".join(sorted(ranked[:n]))
