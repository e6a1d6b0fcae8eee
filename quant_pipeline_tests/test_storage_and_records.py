"""Pure functions behind the assets: hashing, atomic writes, artifact IDs, fingerprints, deltas."""

import json
from pathlib import Path

import pandas as pd
import pytest

from quant_pipeline.delta_report import Policy, compute_deltas, load_policy
from quant_pipeline.errors import AuditInputError
from quant_pipeline.quantized_artifact import artifact_id
from quant_pipeline.runtime_environment import fingerprint_changes, fingerprint_hash, runtime_fingerprint
from quant_pipeline.settings import DEFAULT_POLICY, Recipe
from quant_pipeline.storage import atomic_directory, diff_hashes, file_hashes, hash_directory


def test_atomic_directory_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "artifacts" / "a1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("quantization crashed")
    assert not target.exists()
    assert list((tmp_path / "artifacts").iterdir()) == []


def test_atomic_directory_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "a2"
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        assert not target.exists()
    assert (target / "model.safetensors").read_bytes() == b"x" * 10


def test_directory_hash_changes_with_content_and_names_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    before_files, before = file_hashes(tmp_path), hash_directory(tmp_path)
    (tmp_path / "b.txt").write_text("TWO")
    assert hash_directory(tmp_path) != before
    assert diff_hashes(before_files, file_hashes(tmp_path)) == ["b.txt: content changed"]


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


def test_runtime_fingerprint_names_libraries_and_cpu_and_reports_changes():
    fp = runtime_fingerprint()
    for lib in ("torch", "transformers", "optimum", "gptqmodel", "lm_eval"):
        assert fp["libraries"][lib] != "not installed", lib
    assert fp["cpu"]["model"] and isinstance(fp["cpu"]["isa"], list)
    older = json.loads(json.dumps(fp))
    older["libraries"]["torch"] = "2.12.0"
    assert fingerprint_hash(older) != fingerprint_hash(fp)
    assert fingerprint_changes(older, fp) == [f"libraries.torch: 2.12.0 -> {fp['libraries']['torch']}"]


def test_shipped_policy_is_valid_and_hashed():
    policy, digest = load_policy(DEFAULT_POLICY)
    assert "acc" in policy.tolerances and len(digest) == 64


def test_policy_errors_name_the_field(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("name: x\ntolerances:\n  acc: {direction: up, tolerance: 0.1}\n")
    with pytest.raises(AuditInputError, match=r"field `tolerances.acc.direction`"):
        load_policy(bad)
    bad.write_text("name: x\ntolerances: [\n")
    with pytest.raises(AuditInputError, match=r"p.yaml:\d+: not valid YAML"):
        load_policy(bad)


def _table(values: dict) -> pd.DataFrame:
    return pd.DataFrame([{"model": "m", "task": "t", "category": c, "metric": m, "value": v, "stderr": 0.0} for (c, m), v in values.items()])


def test_one_failing_slice_fails_even_when_the_average_holds():
    policy = Policy.model_validate({"name": "p", "tolerances": {"acc": {"direction": "higher_is_better", "tolerance": 0.05}}})
    base = _table({("facts", "acc"): 0.60, ("reading", "acc"): 0.60, ("arithmetic", "acc"): 0.60})
    quant = _table({("facts", "acc"): 0.70, ("reading", "acc"): 0.68, ("arithmetic", "acc"): 0.45})  # mean rises
    deltas = compute_deltas(base, quant, policy)
    assert quant["value"].mean() > base["value"].mean()
    assert deltas.set_index("category")["passed"].to_dict() == {"facts": True, "reading": True, "arithmetic": False}


def test_relative_tolerance_and_lower_is_better_metrics():
    policy = Policy.model_validate({"name": "p", "tolerances": {"word_perplexity": {"direction": "lower_is_better", "mode": "relative", "tolerance": 0.10, "per_category": {"code": 0.30}}}})
    base = _table({("heldout", "word_perplexity"): 20.0, ("code", "word_perplexity"): 10.0})
    quant = _table({("heldout", "word_perplexity"): 23.0, ("code", "word_perplexity"): 12.0})
    rows = compute_deltas(base, quant, policy).set_index("category")
    assert rows.loc["heldout", "degradation"] == pytest.approx(0.15) and not rows.loc["heldout", "passed"]
    assert rows.loc["code", "tolerance"] == 0.30 and rows.loc["code", "passed"]


def test_a_missing_quantized_measurement_fails_its_slice():
    policy = Policy.model_validate({"name": "p", "tolerances": {"acc": {"direction": "higher_is_better", "tolerance": 0.05}}})
    deltas = compute_deltas(_table({("facts", "acc"): 0.5}), _table({("other", "acc"): 0.5}), policy)
    assert not deltas.set_index("category").loc["facts", "passed"]


def test_grouping_layers_that_share_an_input_quantizes_to_the_same_bytes(tiny_llama, tmp_path, monkeypatch):
    """q/k/v (and gate/up) read one input, so one calibration pass per group gives each the same
    Hessian as a pass per layer, and a group's pass may stop once its layers have their inputs:
    the packed weights must be identical, only faster to produce."""
    from quant_pipeline import quantized_artifact
    from quant_pipeline.calibration_set import load_calibration_texts
    from quant_pipeline.settings import DEFAULT_CALIBRATION

    from .conftest import TINY_RECIPE

    texts = load_calibration_texts(DEFAULT_CALIBRATION)
    assert quantized_artifact.block_groups(tiny_llama) == quantized_artifact.LLAMA_BLOCK_GROUPS
    grouped_passes = quantized_artifact.quantize(tiny_llama, texts, TINY_RECIPE, tmp_path / "grouped")
    monkeypatch.setattr(quantized_artifact, "block_groups", lambda path: None)  # one full pass per linear layer
    per_layer_passes = quantized_artifact.quantize(tiny_llama, texts, TINY_RECIPE, tmp_path / "per_layer")
    # every sample's q/k/v, o and gate/up passes stop early in both blocks; only down's runs in full
    assert grouped_passes == {"calibration_passes_cut_short": 2 * TINY_RECIPE.calibration_samples * 3}
    assert per_layer_passes == {"calibration_passes_cut_short": 0}
    grouped = json.loads((tmp_path / "grouped" / "config.json").read_text())["quantization_config"]
    assert grouped["modules_in_block_to_quantize"] == quantized_artifact.LLAMA_BLOCK_GROUPS
    assert file_hashes(tmp_path / "grouped")["model.safetensors"] == file_hashes(tmp_path / "per_layer")["model.safetensors"]
