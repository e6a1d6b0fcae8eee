"""Shared fixtures: a tiny random Llama (seconds to quantize), an isolated store, MLflow and Dagster.

Everything is real: the tiny model is a genuine LlamaForCausalLM with SmolLM2's tokenizer, GPTQ
runs through gptqmodel, lm-eval scores the shipped tasks, MLflow writes to SQLite in a temp dir.
"""

import os
from pathlib import Path

import dagster as dg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QP_REAUDIT_SCHEDULE", "off")  # the weekly schedule stays off in tests

from quant_pipeline.core.paths import default_gguf_path  # noqa: E402
from quant_pipeline.core.tracking import MlflowTracker  # noqa: E402
from quant_pipeline.defs.resources import AuditSettings  # noqa: E402
from quant_pipeline_tests.support import TINY_RECIPE  # noqa: E402


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    assert gguf.exists(), f"{gguf} missing: run `make install`"
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A 2-layer, 128-wide randomly initialised Llama saved as a safetensors checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def mlflow_tracker(tmp_path) -> MlflowTracker:
    return MlflowTracker(
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=(tmp_path / "mlartifacts").as_uri()
    )


@pytest.fixture
def tiny_settings(tmp_path, tiny_llama) -> AuditSettings:
    return AuditSettings(
        model=str(tiny_llama),
        store_dir=str(tmp_path / "store"),
        recipe=TINY_RECIPE,
        eval_limit=4,
        eval_max_new_tokens=16,
    )


@pytest.fixture
def lenient_policy(tmp_path) -> Path:
    """A random tiny model has no skill to lose; these tolerances let the gate pass so approval runs."""
    path = tmp_path / "lenient.yaml"
    path.write_text(
        "name: lenient-test\ntolerances:\n"
        "  acc: {direction: higher_is_better, mode: absolute, tolerance: 1.0}\n"
        "  word_perplexity: {direction: lower_is_better, mode: relative, tolerance: 10.0}\n"
    )
    return path


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as inst:
        yield inst
