"""Artifact IDs: the same inputs give the same ID, any changed input a new one."""

from quant_pipeline.core.recipe import Recipe
from quant_pipeline.models.gptq import artifact_id


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
    }
    assert base not in variants and len(variants) == 4
