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


def test_the_most_sensitive_types_come_first_in_the_recipe_spelling():
    scores = {"q_proj": 0.1, "down_proj": 0.5, "o_proj": 0.3, "k_proj": 0.3}
    assert most_sensitive(scores, 1) == "down_proj"
    assert most_sensitive(scores, 3) == "down_proj.k_proj.o_proj"  # ties by name, then sorted for the key
