"""What the pipeline reads off an architecture (meta device: no weights, no memory), and the pre-run refusals
that follow from it: group sizes that split a layer's input unevenly, methods that would quantize nothing."""

import pytest
from transformers import Gemma2Config, Gemma3TextConfig, GPT2Config, LlamaConfig, Phi3Config

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.models.architectures import describe
from quant_pipeline.models.methods import check_recipe_fits

SMALL = {"vocab_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def gpt2(width: int = 64) -> dict:
    return GPT2Config(vocab_size=256, n_embd=width, n_layer=2, n_head=4).to_dict()


def llama(hidden: int = 64, intermediate: int = 128) -> dict:
    return LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, **SMALL).to_dict()


def test_gpt2_widths_are_read_from_its_conv1d_layers_not_config_names():
    arch = describe(gpt2(96), "tiny-gpt2")
    assert arch.input_widths == {
        "transformer.h.*.attn.c_attn": 96,
        "transformer.h.*.attn.c_proj": 96,
        "transformer.h.*.mlp.c_fc": 96,
        "transformer.h.*.mlp.c_proj": 4 * 96,  # n_inner unset: 4 x n_embd, which no config key states
    }
    assert arch.conv1d == frozenset(arch.input_widths) and arch.hidden_size == 96 and not arch.llama_block


def test_a_llama_block_is_recognised_by_its_seven_projections_and_a_fused_phi3_block_is_not():
    arch = describe(llama(), "tiny-llama")
    assert arch.llama_block and arch.conv1d == frozenset() and arch.logit_softcap is None
    assert arch.input_widths["model.layers.*.mlp.down_proj"] == 128
    phi3 = describe(Phi3Config(hidden_size=64, intermediate_size=128, pad_token_id=None, **SMALL).to_dict(), "phi3")
    assert not phi3.llama_block
    assert phi3.input_widths["model.layers.*.self_attn.qkv_proj"] == 64
    assert phi3.input_widths["model.layers.*.mlp.down_proj"] == 128


def test_the_logit_softcap_is_read_where_the_model_caps_its_logits():
    gemma = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "pad_token_id": None, **SMALL}
    assert describe(Gemma2Config(**gemma).to_dict(), "gemma2").logit_softcap == 30.0
    assert describe(Gemma3TextConfig(**gemma).to_dict(), "gemma3").logit_softcap is None
    capped = Gemma3TextConfig(**gemma, final_logit_softcapping=20.0).to_dict()
    assert describe(capped, "gemma3").logit_softcap == 20.0


def test_a_group_size_that_does_not_divide_gpt2s_width_is_refused_with_sizes_that_fit():
    with pytest.raises(AuditInputError) as err:
        check_recipe_fits(Recipe(group_size=64), gpt2(96), "tiny-gpt2")
    assert str(err.value) == (
        "recipe.group_size=64 does not divide tiny-gpt2's hidden_size 96: "
        "use group_size 32 (fits every layer, as do [16, 32])"
    )


def test_a_group_size_that_splits_only_an_inner_layer_names_that_layer():
    with pytest.raises(
        AuditInputError, match=r"tiny's model.layers.\*.mlp.down_proj input width 96: use group_size 32"
    ):
        check_recipe_fits(Recipe(group_size=64), llama(64, 96), "tiny")
    check_recipe_fits(Recipe(method="torchao-int8-weight"), llama(64, 96), "tiny")  # not grouped: no width check


@pytest.mark.parametrize("method", ["torchao-int8-weight", "torchao-int8-dynamic", "torchao-int4-weight", "hqq"])
def test_a_linear_only_method_on_gpt2_is_refused_in_one_line_naming_what_to_use(method):
    with pytest.raises(AuditInputError) as err:
        check_recipe_fits(Recipe(method=method), gpt2(), "tiny-gpt2")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"recipe.method={method!r} cannot quantize tiny-gpt2 (gpt2): ")
    assert "Conv1D" in message and message.endswith("use gptq, bnb-int8 or bnb-nf4")


@pytest.mark.parametrize("method", ["gptq", "bnb-int8", "bnb-nf4", "identity"])
def test_gptq_bitsandbytes_and_identity_take_gpt2(method):
    check_recipe_fits(Recipe(method=method), gpt2(), "tiny-gpt2")


def test_keep_is_refused_on_a_block_that_is_not_llamas():
    with pytest.raises(AuditInputError, match="keeping layer types needs a Llama-style block.*'gpt2'"):
        check_recipe_fits(Recipe(keep="down_proj"), gpt2(), "tiny-gpt2")
    check_recipe_fits(Recipe(keep="down_proj"), llama(), "tiny-llama")


def test_an_architecture_transformers_cannot_build_is_refused_in_one_line():
    with pytest.raises(AuditInputError, match="model_type 'no-such-arch' is not an architecture transformers"):
        check_recipe_fits(Recipe(), {"model_type": "no-such-arch"}, "odd")


def test_a_mixture_of_experts_with_fused_expert_tensors_is_refused_for_every_quantizing_method():
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=64, intermediate_size=128, num_local_experts=4, **SMALL).to_dict()
    assert describe(config, "moe").fused_experts == {
        "model.layers.*.mlp.experts.gate_up_proj", "model.layers.*.mlp.experts.down_proj"
    }  # fmt: skip
    with pytest.raises(AuditInputError, match=r"cannot quantize moe \(mixtral\): mixtral's experts are 3-D tensors"):
        check_recipe_fits(Recipe(method="bnb-int8"), config, "moe")
    check_recipe_fits(Recipe(method="identity"), config, "moe")
