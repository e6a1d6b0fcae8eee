"""The base's output layer read alone from its checkpoint computes what the loaded model's does, bit for bit."""

import pytest
import torch

from quant_pipeline.models import output_layer
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.output_layer import load_output_layer


def _write(path, model):
    model.save_pretrained(path, safe_serialization=True)
    return path


def _untied_llama(path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, tie_word_embeddings=False,
    )  # fmt: skip
    return _write(path, LlamaForCausalLM(config))


def _tied_gpt2(path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    return _write(path, GPT2LMHeadModel(GPT2Config(vocab_size=96, n_embd=32, n_layer=1, n_head=2)))


@pytest.mark.parametrize("build", ["tiny_llama", "untied_llama", "tied_gpt2"])
def test_the_output_layer_alone_is_the_loaded_models_read_without_loading_it(build, request, tmp_path, monkeypatch):
    """Tied to the input embedding (stored once: SmolLM2, the tiny model, GPT-2's `transformer.wte`) or stored as
    `lm_head` of its own: the same weight, and the same logits from the same states."""
    from transformers import AutoModelForCausalLM

    path = {
        "tiny_llama": lambda: request.getfixturevalue("tiny_llama"),
        "untied_llama": lambda: _untied_llama(tmp_path / "untied"),
        "tied_gpt2": lambda: _tied_gpt2(tmp_path / "gpt2"),
    }[build]()
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).get_output_embeddings()

    def whole_model(*args, **kwargs):
        raise AssertionError("the whole model was loaded for its output layer")

    monkeypatch.setattr(output_layer, "load_model", whole_model)
    alone = load_output_layer(path)
    assert type(alone) is torch.nn.Linear and torch.equal(alone.weight, loaded.weight)
    states = torch.randn(5, loaded.in_features, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(alone(states), loaded(states))


def test_a_checkpoint_saved_quantized_gets_its_output_layer_from_the_loaded_model(tiny_llama, tmp_path, monkeypatch):
    """A checkpoint whose config carries a quantization config keeps the layer its loader makes of it."""
    import json
    import shutil

    copy = shutil.copytree(tiny_llama, tmp_path / "marked")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "unknown"}}))
    calls = []
    monkeypatch.setattr(output_layer, "load_model", lambda *a: calls.append(a) or load_model(tiny_llama))
    layer = load_output_layer(copy)
    assert len(calls) == 1 and torch.equal(layer.weight, load_model(tiny_llama)[0].get_output_embeddings().weight)
