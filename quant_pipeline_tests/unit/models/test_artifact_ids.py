"""Artifact IDs: the same inputs give the same ID, any changed input a new one."""

import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe, candidate_key, recipe_from_key
from quant_pipeline.models.methods import artifact_id as artifact_id_of
from quant_pipeline.models.methods import precision
from quant_pipeline.models.sensitivity import rtn_grid


def artifact_id(*inputs, model_name: str = "m") -> str:
    """The ID of one registered model's artifact (the model is an input of its own: see the test below)."""
    return artifact_id_of(*inputs, model_name=model_name)


def test_artifact_id_is_stable_and_changes_with_each_input():
    recipe = Recipe()
    base = artifact_id("b" * 64, recipe, "c" * 64, "r" * 64)
    assert base == artifact_id("b" * 64, Recipe(), "c" * 64, "r" * 64)
    assert base.startswith("gptq-w4g64-")
    variants = {
        artifact_id("B" * 64, recipe, "c" * 64, "r" * 64),
        artifact_id("b" * 64, Recipe(damp_percent=0.05), "c" * 64, "r" * 64),
        artifact_id("b" * 64, recipe, "C" * 64, "r" * 64),
        artifact_id("b" * 64, recipe, "c" * 64, "R" * 64),
        artifact_id("b" * 64, recipe, "c" * 64, "r" * 64, model_name="another-model"),
    }
    assert base not in variants and len(variants) == 5


def test_the_same_weights_under_two_registered_names_are_two_artifacts():
    """An artifact belongs to one registered model: its record, trail and registry versions name it."""
    ids = {artifact_id("b" * 64, recipe, None, "r" * 64, model_name=name)
           for recipe in (Recipe(), Recipe(method="torchao-int8-weight")) for name in ("final", "qwen2")}  # fmt: skip
    assert len(ids) == 4


def test_a_data_free_method_ignores_the_calibration_set_and_the_fields_it_does_not_use():
    int8 = Recipe(method="torchao-int8-weight")
    base = artifact_id("b" * 64, int8, "c" * 64, "r" * 64)
    assert base.startswith("torchao-int8w-")
    assert base == artifact_id("b" * 64, int8, "C" * 64, "r" * 64)  # a new calibration set: same bytes, same ID
    assert base == artifact_id("b" * 64, Recipe(method="torchao-int8-weight", damp_percent=0.05), "c" * 64, "r" * 64)
    assert base != artifact_id("b" * 64, Recipe(method="torchao-int8-dynamic"), "c" * 64, "r" * 64)
    assert artifact_id("b" * 64, Recipe(), "c" * 64, "r" * 64) != artifact_id("b" * 64, Recipe(), "C" * 64, "r" * 64)


def test_the_gptq_id_is_what_it_was_before_methods_existed():
    """Existing GPTQ artifacts keep their IDs: the recipe dict of GPTQ did not change shape."""
    assert Recipe().as_dict() == {
        "method": "gptq", "bits": 4, "group_size": 64, "desc_act": False, "sym": True, "damp_percent": 0.1,
        "calibration_samples": 64, "seq_len": 256,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("recipe", "named"),
    [
        (Recipe(method="awq"), "recipe.method='awq'"),
        (Recipe(method="torchao-int4-weight", group_size=-1), "group_size"),
    ],
)
def test_an_unknown_method_or_a_setting_it_cannot_take_is_refused_by_name(recipe, named):
    with pytest.raises(AuditInputError, match=named):
        recipe.validate_values()


def test_a_data_free_candidate_that_keeps_layer_types_is_another_id_and_its_key_round_trips():
    plain, kept = Recipe(method="torchao-int8-weight"), Recipe(method="torchao-int8-weight", keep="v_proj")
    assert plain.as_dict() == {"method": "torchao-int8-weight"}  # plain torchao IDs stand
    assert artifact_id("b" * 64, plain, None, "r" * 64) != artifact_id("b" * 64, kept, None, "r" * 64)
    assert artifact_id("b" * 64, kept, "c" * 64, "r" * 64) == artifact_id("b" * 64, kept, "C" * 64, "r" * 64)
    assert candidate_key(kept) == "torchao-int8-weight-xv_proj" and recipe_from_key(candidate_key(kept)) == kept
    assert "v_proj kept at fp32" in precision(kept)


def test_each_method_is_ranked_on_its_own_rounding_grid():
    assert rtn_grid(Recipe(method="torchao-int8-weight")) == (8, -1, True)
    assert rtn_grid(Recipe(method="torchao-int8-dynamic")) == (8, -1, True)
    assert rtn_grid(Recipe(method="torchao-int4-weight", group_size=32)) == (4, 32, True)
    assert rtn_grid(Recipe(bits=3, group_size=128, sym=False)) == (3, 128, False)
