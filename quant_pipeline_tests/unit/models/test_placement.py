"""One placement for every model of an audit (#17): a GPU asked for where there is none is refused in one line,
GPTQ made on a GPU gets its own artifact ID, and the gate gives no verdict on evaluations placed differently."""

from pathlib import Path

import pytest
import torch

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.defs.gate import judge
from quant_pipeline.evaluation.policy import Policy
from quant_pipeline.models.methods import artifact_id
from quant_pipeline.models.placement import CPU, Placement, mismatch, placement
from quant_pipeline_tests.tables import items_table, results_table

GPU = Placement("cuda", "float16")


def test_cpu_computes_in_float32_and_auto_follows_what_torch_sees():
    assert placement("cpu") == CPU and CPU.torch_dtype is torch.float32
    assert placement("auto") == (GPU if torch.cuda.is_available() else CPU)


def test_an_unknown_device_is_refused_naming_the_setting():
    with pytest.raises(AuditInputError, match=r"device 'tpu' \(`QP_DEVICE`\): use one of auto, cpu, cuda"):
        placement("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is a valid placement here")
def test_cuda_without_a_gpu_is_refused_in_one_line_with_the_fix():
    with pytest.raises(AuditInputError) as refused:
        placement("cuda")
    message = str(refused.value)
    assert "\n" not in message and "sees no CUDA device" in message and "QP_DEVICE=cpu" in message


def test_gptq_made_on_a_gpu_is_another_artifact_while_cpu_ids_and_data_free_ids_stay_as_they_were():
    gptq, torchao = Recipe(method="gptq"), Recipe(method="torchao-int8-weight")
    ids = {
        (recipe.method, where): artifact_id("b" * 64, recipe, "c" * 64, "r" * 64, model_name="m", where=where)
        for recipe in (gptq, torchao)
        for where in (CPU, GPU)
    }
    assert ids[("gptq", CPU)] == artifact_id("b" * 64, gptq, "c" * 64, "r" * 64, model_name="m")
    assert ids[("gptq", CPU)] != ids[("gptq", GPU)]
    assert ids[("torchao-int8-weight", CPU)] == ids[("torchao-int8-weight", GPU)]  # rounded on the CPU either way


def test_evaluations_on_one_placement_compare_and_records_from_before_placement_count_as_cpu():
    assert mismatch(CPU.record(), CPU.record()) is None
    assert mismatch({}, CPU.record()) is None
    reason = mismatch(CPU.record(), GPU.record())
    assert "base ran on cpu in float32 and the quantized model on cuda in float16" in reason


def test_the_gate_gives_no_verdict_on_a_base_and_a_candidate_evaluated_on_different_placements(tmp_path):
    """Deltas that would PASS are no evidence when a dtype change is mixed into them: INCOMPLETE, with why."""
    policy = Policy.model_validate({
        "name": "p", "min_items": 1, "tolerances": {"acc": {"direction": "higher_is_better", "tolerance": 0.2}},
    })  # fmt: skip
    evals = {}
    for label, where in (("base", CPU), ("quantized", GPU)):
        results, items = tmp_path / f"{label}_results.parquet", tmp_path / f"{label}_items.parquet"
        results_table({("facts", "acc"): 0.8}).to_parquet(results)
        items_table({("facts", "acc"): [1] * 40 + [0] * 10}).assign(task="qp_golden_facts").to_parquet(items)
        evals[label] = {
            "key": f"{label}-key", "results_path": str(results), "items_path": str(items), "execution": where.record()
        }  # fmt: skip
    artifact = {"artifact_id": "gptq-w4-g64-aaaa", "model_name": "m", "registry_version": "1", "size_bytes": 1}
    store = ArtifactStore(tmp_path / "store")
    record, _, _, _ = judge(
        store, artifact, evals["base"], evals["quantized"], policy, tmp_path / "p.yaml", "f" * 64, {}
    )
    assert record.verdict == "INCOMPLETE" and not record.passed
    assert "quantized model on cuda in float16" in record.reasons[0]
    shown = Path(record.html_path).read_text()  # the reviewer's document says where each side ran
    assert (
        '<th scope="row">Placement (device, compute dtype)</th><td>base cpu, float32; quantized cuda, float16' in shown
    )

    evals["quantized"]["execution"] = CPU.record()
    evals["quantized"]["key"] = "quantized-cpu-key"
    record, _, _, _ = judge(
        store, artifact, evals["base"], evals["quantized"], policy, tmp_path / "p.yaml", "f" * 64, {}
    )
    assert record.verdict == "PASS"  # the same tables on one placement: the placement alone made it INCOMPLETE
    assert "<td>cpu, float32 (base and quantized)</td>" in Path(record.html_path).read_text()
