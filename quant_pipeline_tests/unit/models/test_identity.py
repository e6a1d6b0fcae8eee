"""Identity by content and name: which registered model a checkpoint is (its name: explicit, from its metadata,
else its folder; the architecture its name stands for), and which calibration an artifact read (the samples used,
not the file)."""

import json

import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import RECORD_FILE, file_hashes, sha256_file, tree_hash
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.records import Architecture, CheckpointRecord
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.models.calibration import tokenizer_hash, used_samples_hash
from quant_pipeline.models.checkpoint import (
    ModelSource,
    describe_checkpoint,
    materialize_checkpoint,
    resolve_model_source,
)
from quant_pipeline.models.identity import architecture_of, check_same_architecture, name_from_config, safe_name

LLAMA = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 4}  # fmt: skip


def checkpoint(folder, config: dict):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_a_checkpoint_is_named_by_its_hub_id_else_by_its_folder(tmp_path):
    named = checkpoint(tmp_path / "a" / "final", {**LLAMA, "_name_or_path": "Qwen/Qwen2-0.5B"})
    local = checkpoint(tmp_path / "b" / "final", {**LLAMA, "_name_or_path": str(tmp_path / "b" / "final")})
    assert resolve_model_source(str(named)).name == "Qwen--Qwen2-0.5B"
    assert resolve_model_source(str(local)).name == "final"  # a path says no more than the folder does
    assert name_from_config({"_name_or_path": "not a hub id"}) is None


def test_an_explicit_name_names_only_the_model_the_settings_name(tmp_path):
    one, other = checkpoint(tmp_path / "one" / "final", LLAMA), checkpoint(tmp_path / "two" / "final", LLAMA)
    settings = AuditSettings(model=str(one), model_name="support-bot", store_dir=str(tmp_path / "store"))
    assert settings.source().name == "support-bot" and settings.source(str(one)).name == "support-bot"
    assert settings.source(str(other)).name == "final"  # another partition keeps its own name
    with pytest.raises(AuditInputError, match=r"model name \(QP_MODEL_NAME, --model-name\) 'no spaces allowed'"):
        AuditSettings(model=str(one), model_name="no spaces allowed").source()


def test_a_name_from_metadata_is_made_safe_or_dropped():
    assert safe_name("Smollm2 135M 8k Lc100K Mix1 Ep2") == "Smollm2-135M-8k-Lc100K-Mix1-Ep2"
    assert safe_name("  ../..  ") is None and safe_name(None) is None


def test_the_architecture_is_read_under_each_family_s_spelling():
    gpt2 = architecture_of({"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": None})
    assert gpt2 == Architecture(model_type="gpt2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    nested = architecture_of({"model_type": "gemma3", "text_config": {**LLAMA, "model_type": "gemma3_text"}})
    assert nested.model_type == "gemma3_text" and nested.hidden_size == 128


def test_a_checkpoint_of_another_architecture_is_refused_under_the_same_name_unless_declared_new():
    previous = architecture_of(LLAMA)
    check_same_architecture("final", None, {**LLAMA, "hidden_size": 64}, False)  # nothing recorded yet
    check_same_architecture("final", previous, {**LLAMA, "vocab_size": 7}, False)  # same widths and depth
    wider = {**LLAMA, "model_type": "qwen2", "hidden_size": 896}
    with pytest.raises(AuditInputError) as refused:
        check_same_architecture("final", previous, wider, False)
    line = str(refused.value)
    assert "\n" not in line and "model final" in line and "llama (hidden_size=128" in line
    assert "qwen2 (hidden_size=896" in line and "QP_MODEL_NAME" in line and "QP_NEW_BASE_VERSION=1" in line
    check_same_architecture("final", previous, wider, True)  # declared a new base version


def test_the_calibration_identity_is_the_samples_used_and_how_they_are_tokenized():
    texts = [f"sample {i}" for i in range(12)]
    recipe, tok = Recipe(calibration_samples=8, seq_len=64), "t" * 64
    used = used_samples_hash(texts, recipe, tok)
    assert used == used_samples_hash([*texts[:8], "an edited line no recipe reads", *texts[9:]], recipe, tok)
    assert used == used_samples_hash(texts[:8], recipe, tok)  # lines after the used ones dropped
    changed = {
        used_samples_hash(["edited", *texts[1:]], recipe, tok),
        used_samples_hash(texts, Recipe(calibration_samples=8, seq_len=128), tok),
        used_samples_hash(texts, Recipe(calibration_samples=9, seq_len=64), tok),
        used_samples_hash(texts, recipe, "T" * 64),
    }
    assert used not in changed and len(changed) == 4


def test_the_tokenizer_hash_covers_the_tokenizing_files_only():
    files = {"tokenizer.json": "a" * 64, "tokenizer_config.json": "b" * 64, "model.safetensors": "c" * 64}
    assert tokenizer_hash(files) == tokenizer_hash({**files, "model.safetensors": "d" * 64})
    assert tokenizer_hash(files) != tokenizer_hash({**files, "tokenizer.json": "e" * 64})


def test_a_kept_baseline_found_by_name_is_not_reused_for_another_gguf_of_that_name(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    for path, body in ((first, b"one"), (second, b"two")):
        path.parent.mkdir()
        path.write_bytes(body)
    kept = store.checkpoint_dir("llama")
    kept.mkdir(parents=True)
    (kept / "config.json").write_text("{}")
    source = ModelSource("gguf", str(first.parent), "llama", first.name)
    files = file_hashes(kept)
    record = {**source.__dict__, "sha256": sha256_file(first)}
    CheckpointRecord(source=record, files=files, hash=tree_hash(files)).write(kept / RECORD_FILE)
    assert materialize_checkpoint(source, store) == kept  # the file it was converted from: reused
    with pytest.raises(AuditInputError, match="converted from .*a/model.gguf, not from .*b/model.gguf"):
        materialize_checkpoint(ModelSource("gguf", str(second.parent), "llama", second.name), store)


def test_the_base_record_reads_widths_under_each_family_s_spelling(tmp_path):
    """GPT-2 says n_embd/n_layer: the base checkpoint's record has its widths, not None."""
    import torch
    from safetensors.torch import save_file

    folder = checkpoint(tmp_path / "gpt2", {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 96,
                                             "n_inner": 384, "n_layer": 2, "n_head": 4})  # fmt: skip
    save_file({"wte.weight": torch.zeros(8, 96)}, folder / "model.safetensors")
    facts = describe_checkpoint(folder)
    assert (facts["hidden_size"], facts["intermediate_size"], facts["num_hidden_layers"]) == (96, 384, 2)
    assert facts["num_parameters"] == 8 * 96 and facts["architecture"] == "GPT2LMHeadModel"


def test_a_gguf_s_name_is_read_from_its_header_as_gguf_s_own_reader_reads_it(tmp_path):
    """The header is walked up to `general.name` (no vocabulary parsed); the value is gguf's reader's."""
    from gguf import GGUFReader

    from quant_pipeline.core.paths import default_gguf_path
    from quant_pipeline.models.identity import gguf_name

    path = default_gguf_path()
    field = GGUFReader(str(path)).fields["general.name"]
    assert gguf_name(path) == safe_name(bytes(field.parts[field.data[0]]).decode("utf-8"))
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    assert gguf_name(tmp_path / "fake.gguf") is None
