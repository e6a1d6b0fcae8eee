"""HQQ candidates: their keys and IDs, and the checkpoint they save: safetensors that `load_model` restores to the
very layers that were quantized, the kept layer types left fp32, and nothing else accepted in its place."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe, candidate_key, recipe_from_key
from quant_pipeline.models import hqq
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.methods import artifact_id as artifact_id_of
from quant_pipeline.models.methods import precision, quantize, scale_summary
from quant_pipeline.models.sensitivity import rtn_grid


def artifact_id(*inputs, model_name: str = "m") -> str:
    """The ID of one registered model's artifact (the model is an input: test_artifact_ids)."""
    return artifact_id_of(*inputs, model_name=model_name)


KEPT = Recipe(method="hqq", bits=4, group_size=64, keep="down_proj.v_proj")


def test_an_hqq_key_names_its_bits_and_group_and_round_trips():
    for key, bits, group in (("hqq-w4-g64", 4, 64), ("hqq-w8-g64", 8, 64), ("hqq-w8-gchannel", 8, -1)):
        recipe = recipe_from_key(key)
        assert (recipe.method, recipe.bits, recipe.group_size) == ("hqq", bits, group) and candidate_key(recipe) == key
    assert recipe_from_key("hqq-w4-g64-xdown_proj.v_proj") == KEPT
    assert Recipe(method="hqq").as_dict() == {"method": "hqq", "bits": 4, "group_size": 64}
    assert artifact_id("b" * 64, KEPT, "c" * 64, "r" * 64) == artifact_id("b" * 64, KEPT, "C" * 64, "r" * 64)
    assert artifact_id("b" * 64, Recipe(method="hqq"), None, "r" * 64).startswith("hqq-w4g64-")
    assert rtn_grid(Recipe(method="hqq", bits=8, group_size=32)) == (8, 32, False)  # asymmetric: zero point
    stated = precision(KEPT)
    assert "int4" in stated and "axis 1" in stated and "fp32 compute" in stated and "v_proj kept at fp32" in stated
    with pytest.raises(AuditInputError, match="not supported by HQQ"):
        recipe_from_key("hqq-w5-g64")
    with pytest.raises(AuditInputError, match="HQQ needs a multiple of 8"):
        recipe_from_key("hqq-w4-g36")
    with pytest.raises(AuditInputError, match="write it as 'hqq-w4-g64'"):
        recipe_from_key("hqq-g64-w4")


@pytest.fixture(scope="module")
def hqq_artifact(tmp_path_factory, tiny_llama):
    out = tmp_path_factory.mktemp("hqq")
    quantize(tiny_llama, [], KEPT, out)
    return out


def _logits(model):
    with torch.inference_mode():
        return model(input_ids=torch.arange(1, 33).unsqueeze(0)).logits


def test_the_checkpoint_is_safetensors_that_reload_to_the_layers_that_were_quantized(hqq_artifact, tiny_llama):
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    assert sorted(p.name for p in hqq_artifact.iterdir() if "safetensors" in p.name) == ["model.hqq.safetensors"]
    assert not [p for p in hqq_artifact.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    config = json.loads((hqq_artifact / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "hqq"
    assert config["skip_modules"] == ["lm_head", "mlp.down_proj", "self_attn.v_proj"]
    assert {"nbits": 4, "group_size": 64, "axis": 1}.items() <= config["quant_config"]["weight_quant_params"].items()
    model, _ = load_model(hqq_artifact)
    layers = {(n.rsplit(".", 1)[-1], type(m).__name__) for n, m in model.get_decoder().named_modules() if "proj" in n}
    assert {t for t, kind in layers if kind == "Linear"} == {"down_proj", "v_proj"}  # kept: fp32, every block
    assert {kind for t, kind in layers if t not in ("down_proj", "v_proj")} == {"HQQLinear"}
    q_proj = model.get_decoder().layers[0].self_attn.q_proj
    assert (q_proj.meta["nbits"], q_proj.meta["group_size"], q_proj.meta["axis"]) == (4, 64, 1)
    assert q_proj.meta["compute_dtype"] == torch.float32 and model.lm_head.weight is model.get_input_embeddings().weight
    # the same quantization made in memory gives the very logits the reloaded checkpoint gives
    fresh, _ = load_model(tiny_llama)
    for block in fresh.get_decoder().layers:
        for parent in (block.self_attn, block.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, torch.nn.Linear) and name not in ("down_proj", "v_proj"):
                    config = BaseQuantizeConfig(nbits=4, group_size=64, axis=1)
                    setattr(parent, name, HQQLinear(child, config, compute_dtype=torch.float32, device="cpu"))
    assert torch.equal(_logits(model), _logits(fresh))
    summary = scale_summary(hqq_artifact)  # HQQ's per-group scale and zero point, in the record's scale summary
    assert summary["layers"] == 2 * 5 and set(next(iter(summary["per_layer"].values()))) == {"scale", "zero"}


def test_plain_transformers_stops_on_the_checkpoint_instead_of_loading_random_layers(hqq_artifact):
    from transformers import AutoModelForCausalLM

    with pytest.raises(OSError, match="no file named model.safetensors"):
        AutoModelForCausalLM.from_pretrained(hqq_artifact)


def _tampered(src, dst, edit):
    shutil.copytree(src, dst)
    state = load_file(dst / hqq.WEIGHTS)
    edit(state)
    save_file(state, dst / hqq.WEIGHTS)
    return dst


def test_a_dtype_hqq_would_eval_is_refused_before_it_is_read(hqq_artifact, tmp_path):
    code = "__import__('os').getcwd()"
    key = "model.layers.0.self_attn.q_proj.compute_dtype"
    bad = _tampered(hqq_artifact, tmp_path / "bad", lambda s: s.update({key: torch.tensor(list(code.encode()))}))
    with pytest.raises(AuditInputError, match="not a dtype HQQ writes"):
        load_model(bad)


def test_a_checkpoint_missing_a_quantized_layers_tensors_does_not_load(hqq_artifact, tmp_path):
    bad = _tampered(hqq_artifact, tmp_path / "bad", lambda s: s.pop("model.layers.1.mlp.up_proj.scale"))
    with pytest.raises(AuditInputError, match=r"does not fit its architecture.*up_proj"):
        load_model(bad)
