"""Shared fixtures: a tiny random Llama (seconds to quantize), an isolated store, MLflow and Dagster.

Everything is real: the tiny model is a genuine LlamaForCausalLM with a 4,096-token BPE trained on the shipped
text (SmolLM2's special tokens and chat template), GPTQ runs through gptqmodel, lm-eval scores the shipped tasks,
MLflow writes to SQLite in a temp dir.
"""

import os
import shutil
from pathlib import Path

import dagster as dg
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("QP_REAUDIT_SCHEDULE", "off")  # the weekly schedule stays off in tests
# Under pytest-xdist each worker gets its share of the cores, set before torch is first imported: N workers
# each spinning a thread per core would oversubscribe the machine N times over.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

from quant_pipeline.core.paths import default_gguf_path  # noqa: E402
from quant_pipeline.core.perf import freeze_import_heap  # noqa: E402
from quant_pipeline.core.tracking import MlflowTracker  # noqa: E402
from quant_pipeline.defs.resources import AuditSettings  # noqa: E402
from quant_pipeline.models import tiny  # noqa: E402
from quant_pipeline_tests.scheduling import heaviest_files_first  # noqa: E402
from quant_pipeline_tests.support import TINY_RECIPE, audit_world, fresh_audit_world, mlflow_db, run_audit  # noqa: E402

freeze_import_heap()  # each worker audits tiny models all session: its collections skip the imported stack


def pytest_collection_modifyitems(config, items):
    """The heaviest test files first, so that the workers finish together (quant_pipeline_tests/scheduling.py)."""
    items[:] = heaviest_files_first(items)


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    assert gguf.exists(), f"{gguf} missing: run `make install`"
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_tokenizer(smollm2_tokenizer):
    """A 4,096-token BPE trained on the shipped text, with SmolLM2's special tokens and chat template
    (quant_pipeline/models/tiny.py says why). The default-model tests keep SmolLM2's own."""
    return tiny.tiny_tokenizer(smollm2_tokenizer)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer, 128-wide randomly initialised Llama saved as a safetensors checkpoint, with the tiny tokenizer."""
    return tiny.write_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tiny_tokenizer)


@pytest.fixture
def mlflow_tracker(tmp_path) -> MlflowTracker:
    return MlflowTracker(tracking_uri=mlflow_db(tmp_path), artifact_root=(tmp_path / "mlartifacts").as_uri())


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
    """A random tiny model has no skill to lose; these tolerances (on what it can measure) let the gate PASS."""
    path = tmp_path / "lenient.yaml"
    path.write_text(
        "name: lenient-test\nmin_items: 1\ntolerances:\n"
        "  top1_agreement: {direction: higher_is_better, mode: absolute, tolerance: 1.0}\n"
        "  word_perplexity: {direction: lower_is_better, mode: relative, tolerance: 10.0}\n"
    )
    return path


@pytest.fixture
def instance(tmp_path):
    (tmp_path / "dagster_home").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster_home")) as inst:
        yield inst


@pytest.fixture(scope="module")
def audited_once(tmp_path_factory, tiny_llama):
    """One pending audit of the tiny model under a lenient policy, run once for the whole module."""
    root = tmp_path_factory.mktemp("audited")
    settings, tracker = fresh_audit_world(root, tiny_llama)
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        result = run_audit(settings, tracker, instance)
    assert result.success
    return root, result.output_for_node("quantized_artifact")


@pytest.fixture
def audited(audited_once, tmp_path, tiny_llama):
    """A private copy of the shared audit (store, MLflow database, Dagster storage), for a test to change."""
    root, artifact = audited_once
    copy = Path(shutil.copytree(root, tmp_path / "audited", symlinks=True))
    settings, tracker = audit_world(copy, tiny_llama)
    artifact = {**artifact, "path": str(settings.store.artifact_dir(artifact["artifact_id"]))}
    with dg.instance_for_test(temp_dir=str(copy / "dagster")) as instance:
        yield settings, artifact, tracker, instance
