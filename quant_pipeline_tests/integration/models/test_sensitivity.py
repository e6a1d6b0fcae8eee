"""Layer sensitivity: rounding error weighted by real inputs, ranked per layer type, what the search keeps first."""

import torch

from quant_pipeline.core.paths import DEFAULT_CALIBRATION
from quant_pipeline.core.recipe import LAYER_TYPES, Recipe
from quant_pipeline.models.calibration import load_calibration_texts
from quant_pipeline.models.sensitivity import layer_type_sensitivity, most_sensitive, round_to_nearest


def test_round_to_nearest_keeps_representable_weights_and_bounds_the_error_by_half_a_step():
    grid = torch.tensor([[-7.0, -3.0, 0.0, 7.0], [1.0, 2.0, -7.0, 4.0]])  # on the 4-bit symmetric grid, scale 1
    assert torch.equal(round_to_nearest(grid, bits=4, group_size=4), grid)
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    q = round_to_nearest(w, bits=4, group_size=16)
    step = w.reshape(8, 4, 16).abs().amax(-1, keepdim=True) / 7
    assert ((w - q).reshape(8, 4, 16).abs() <= step / 2 + 1e-6).all()
    assert (w - round_to_nearest(w, 8, 16)).abs().max() < (w - q).abs().max()


def test_every_layer_type_is_ranked_and_more_bits_hurt_less(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    texts = load_calibration_texts(DEFAULT_CALIBRATION)
    four = layer_type_sensitivity(model, tokenizer, texts, Recipe(calibration_samples=4, seq_len=32))
    eight = layer_type_sensitivity(model, tokenizer, texts, Recipe(bits=8, calibration_samples=4, seq_len=32))
    assert set(four) == set(LAYER_TYPES) and all(v > 0 for v in four.values())
    assert all(eight[k] < four[k] for k in LAYER_TYPES)
    assert four == layer_type_sensitivity(model, tokenizer, texts, Recipe(calibration_samples=4, seq_len=32))


def test_each_type_measures_its_own_inputs_rounding_error_though_layers_sharing_an_input_share_its_moment(tiny_llama):
    """The definition, computed the long way: every layer's own inputs X, ||X (W - Q(W))^T||^2 / ||X W^T||^2 summed
    per type. The measurement computes X^T X once for q, k and v (and for gate and up), which read one tensor: a
    moment handed to a layer whose input differs would move its type's value here."""
    import pytest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    texts, recipe = load_calibration_texts(DEFAULT_CALIBRATION), Recipe(calibration_samples=3, seq_len=24)
    measured = layer_type_sensitivity(model, tokenizer, texts, recipe)
    layers = {n: m for n, m in model.get_decoder().named_modules() if n.rsplit(".", 1)[-1] in LAYER_TYPES}
    inputs: dict[str, list] = {n: [] for n in layers}
    handles = [
        m.register_forward_pre_hook(lambda m, a, n=n: inputs[n].append(a[0][0].clone())) for n, m in layers.items()
    ]
    with torch.inference_mode():
        for text in texts[:3]:
            model(**tokenizer(text, return_tensors="pt", truncation=True, max_length=24))
    for h in handles:
        h.remove()
    error, signal = dict.fromkeys(LAYER_TYPES, 0.0), dict.fromkeys(LAYER_TYPES, 0.0)
    for name, module in layers.items():
        w = module.weight.detach()
        e = w - round_to_nearest(w, recipe.bits, recipe.group_size)
        for x in inputs[name]:
            error[name.rsplit(".", 1)[-1]] += float((x.double() @ e.T.double()).pow(2).sum())
            signal[name.rsplit(".", 1)[-1]] += float((x.double() @ w.T.double()).pow(2).sum())
    assert measured == pytest.approx({k: error[k] / signal[k] for k in LAYER_TYPES}, rel=1e-4)


def test_the_most_sensitive_types_come_first_in_the_recipe_spelling():
    scores = {"q_proj": 0.1, "down_proj": 0.5, "o_proj": 0.3, "k_proj": 0.3}
    assert most_sensitive(scores, 1) == "down_proj"
    assert most_sensitive(scores, 3) == "down_proj.k_proj.o_proj"  # ties by name, then sorted for the key
