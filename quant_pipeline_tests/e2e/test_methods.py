"""Every quantization method audited end to end on the tiny model, each under its own ID, beside one base eval;
the identity candidate (the base, copied) comes out with every quality delta exactly zero."""

import json
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch

from quant_pipeline.cli import main
from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.recipe import METHOD_FIELDS
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.sensitivity import most_sensitive
from quant_pipeline.release.registry import write_bom
from quant_pipeline_tests.support import (
    LENIENT,
    TINY_RECIPE,
    audit_world,
    cli_home,
    fresh_audit_world,
    replace,
    run_audit,
)


@pytest.fixture(scope="module")
def audited_methods(tmp_path_factory, tiny_llama):
    """One store, one base evaluation, one audit per method (the base's work is reused by key)."""
    root = tmp_path_factory.mktemp("methods")
    settings, tracker = fresh_audit_world(root, tiny_llama)
    results = {}
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        for method in METHOD_FIELDS:
            run = run_audit(
                replace(settings, recipe=TINY_RECIPE.model_copy(update={"method": method})), tracker, instance
            )
            assert run.success, method
            results[method] = {
                "artifact": run.output_for_node("quantized_artifact"),
                "base_eval": run.output_for_node("base_eval_results"),
                "report": run.output_for_node("delta_report"),
            }
        results["tradeoff"] = run.output_for_node("candidate_tradeoff")  # the last run saw every candidate
        results["identity_check"] = [
            c for c in run.get_asset_check_evaluations() if c.check_name == "identity_moves_nothing"
        ]
    return settings, results


def test_every_method_is_audited_under_its_own_id_with_one_shared_base_evaluation(audited_methods):
    _, results = audited_methods
    ids = {m: results[m]["artifact"]["artifact_id"] for m in METHOD_FIELDS}
    assert len(set(ids.values())) == len(METHOD_FIELDS)
    assert ids["gptq"].startswith("gptq-w4g64-") and ids["identity"].startswith("identity-")
    assert len({results[m]["base_eval"]["key"] for m in METHOD_FIELDS}) == 1
    for method in METHOD_FIELDS:
        r = results[method]
        assert r["artifact"]["recipe"]["method"] == method
        assert r["report"]["verdict"] in ("PASS", "FAIL", "INCOMPLETE")


@pytest.mark.parametrize("method", sorted(METHOD_FIELDS))
def test_each_artifact_is_safetensors_that_transformers_reloads(audited_methods, method):
    _, results = audited_methods
    path = Path(results[method]["artifact"]["path"])
    assert not [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
    assert (path / ("model.hqq.safetensors" if method == "hqq" else "model.safetensors")).exists()
    model, _ = load_model(path)
    kernels = {type(getattr(m, "weight", None)).__name__ for m in model.modules() if hasattr(m, "weight")}
    if method.startswith("torchao"):
        assert kernels & {"Int8Tensor", "IntxUnpackedToInt8Tensor"}, kernels
    if method.startswith("bnb"):  # bitsandbytes' own parameter types: the layers reloaded quantized
        assert kernels & {"Int8Params", "Params4bit"}, kernels
    if method == "hqq":  # HQQ's own layer, restored from the safetensors by load_model (transformers 5.24 cannot)
        layers = {type(m).__name__ for n, m in model.get_decoder().named_modules() if n.endswith("_proj")}
        assert layers == {"HQQLinear"}, layers


def test_the_identity_candidate_moves_no_quality_metric_at_all(audited_methods):
    _, results = audited_methods
    report = Path(results["identity"]["report"]["path"])
    deltas = pd.read_parquet(report.with_name("delta_report.parquet"))
    quality = deltas[deltas["category"] != "cost"].dropna(subset=["delta"])
    assert len(quality) > 40 and {"top1_agreement", "kl_divergence", "acc"} <= set(quality["metric"])
    assert (quality["delta"] == 0).all(), quality[quality["delta"] != 0][["category", "metric", "delta"]]
    assert (quality["base"] == quality["quantized"]).all()


def test_a_data_free_candidate_names_no_calibration_set_in_its_record_or_ml_bom(audited_methods):
    settings, results = audited_methods
    artifact = results["torchao-int8-weight"]["artifact"]
    assert artifact["calibration_hash"] is None and artifact["calibration_count"] == 0
    bom = json.loads(write_bom(settings.store, artifact["artifact_id"]).read_text())  # validated against 1.6
    assert not [c for c in bom["components"] if c["bom-ref"].startswith("calibration:")]
    gptq = json.loads(write_bom(settings.store, results["gptq"]["artifact"]["artifact_id"]).read_text())
    assert [c for c in gptq["components"] if c["bom-ref"].startswith("calibration:")]


def test_the_hqq_candidate_states_its_bits_group_axis_and_compute_dtype_in_its_record_and_ml_bom(audited_methods):
    settings, results = audited_methods
    artifact = results["hqq"]["artifact"]
    assert artifact["recipe"] == {"method": "hqq", "bits": 4, "group_size": 64} and artifact["calibration_hash"] is None
    assert artifact["artifact_id"].startswith("hqq-w4g64-")
    record = read_artifact_record(settings.store, artifact["artifact_id"])
    assert record.precision.startswith("int4 weights (HQQ, a scale and a zero point per group of 64 input features")
    assert "axis 1" in record.precision and "fp32 compute" in record.precision and record.layer_sensitivity
    assert record.scales.layers == 2 * 7  # every projection of both blocks: its per-group scale and zero point
    assert record.runtime["libraries"]["hqq"] == "0.2.8.post1"  # in the runtime fingerprint: an input of the ID
    bom = json.loads(write_bom(settings.store, artifact["artifact_id"]).read_text())
    model = bom["metadata"]["component"]
    assert model["bom-ref"] == artifact["artifact_id"] and "quantized with HQQ: int4 weights" in model["description"]
    props = {p["name"].removeprefix("quant_pipeline:"): p["value"] for p in model["properties"]}
    assert (props["recipe:method"], props["recipe:bits"], props["recipe:group_size"]) == ("hqq", "4", "64")
    assert props["precision"] == record.precision


def test_the_tradeoff_lists_every_candidate_and_recommends_the_smallest_passing_quantized_one(audited_methods):
    _, results = audited_methods
    out = Path(results["tradeoff"]["path"])
    table = json.loads((out / "tradeoff.json").read_text())
    rows = {r["candidate"]: r for r in table["rows"]}
    plot = ET.parse(out / "tradeoff.svg").getroot()  # both panels draw every candidate measured
    drawn = [g.get("data-name") for g in plot.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == "candidate"]
    assert len(rows) == len(METHOD_FIELDS) and sorted(drawn) == sorted(2 * list(rows))
    passing = [r for r in rows.values() if r["verdict"] == "PASS" and r["method"] != "identity"]
    assert passing, rows
    assert table["recommended"] == min(passing, key=lambda r: r["size_bytes"])["candidate"]
    assert rows["identity"]["worst_share"] == 0.0 and table["identity_moved"] == []
    assert [c.passed for c in results["identity_check"]] == [True]
    assert "pending sign-off" in table["why"]
    report = out.parent / "audit_report.html"  # the reviewer's report carries the table and the plot
    page = report.read_text()
    assert 'id="candidates"' in page and all(key in page for key in rows) and "data:image/svg+xml;base64," in page


def test_a_candidate_whose_report_was_edited_after_the_gate_is_unverified_and_never_recommended(
    audited_methods, tiny_llama, tmp_path
):
    settings, results = audited_methods
    instance_dir = Path(settings.store_dir).parent / "dagster"
    report = Path(results["torchao-int8-dynamic"]["report"]["path"]).with_name("delta_report.json")
    original = report.read_text()
    report.write_text(original.replace('"verdict": "PASS"', '"verdict": "PASS" ') + " ")
    try:
        with dg.instance_for_test(temp_dir=str(instance_dir)) as instance:
            run = run_audit(settings, _tracker(settings), instance, selection=["candidate_tradeoff"])
        table = json.loads((Path(run.output_for_node("candidate_tradeoff")["path"]) / "tradeoff.json").read_text())
    finally:
        report.write_text(original)
    row = next(r for r in table["rows"] if r["candidate"] == "torchao-int8-dynamic")
    assert row["verdict"] == "UNVERIFIED" and "not the report the gate judged" in row["reason"]
    assert table["recommended"] != "torchao-int8-dynamic"


def _tracker(settings):
    return audit_world(Path(settings.store_dir).parent, Path(settings.model))[1]


def test_the_cli_audits_each_candidate_then_prints_the_table_and_the_recommendation(tmp_path, tiny_llama, capsys):
    policy = tmp_path / "lenient.yaml"
    policy.write_text(LENIENT)
    with cli_home(tmp_path) as (store, _):
        code = main([
            "audit", "--model", str(tiny_llama), "--candidates", "identity,torchao-int8-weight", "--eval-limit", "4",
            "--eval-max-new-tokens", "16", "--policy-file", str(policy),
        ])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0, out
    assert "== candidate 2/2: torchao-int8-weight" in out
    assert "| torchao-int8-weight **(recommended)** | PASS" in out and "| identity | PASS" in out
    assert "quant-pipeline approve torchao-int8w-" in out
    recommended = next(line for line in out.splitlines() if line.startswith("recommended: "))
    assert re.search(r"x the base's size, p50 latency [0-9.]+ s against the base's [0-9.]+ s \([0-9.]+x\)", recommended)
    plot = Path(next(line for line in out.splitlines() if line.startswith("plot: ")).removeprefix("plot: "))
    assert plot.exists() and store.contains(plot)


STRICT = "name: strict\nmin_items: 1\ntolerances:\n  top1_agreement: {direction: higher_is_better, tolerance: 0.0}\n"


def search_under_a_strict_policy(tmp_path, tiny_llama, capsys, candidate: str, budget: int):
    """`audit --candidates <candidate> --search <budget>` on the tiny model under a policy no quantized model
    meets; returns the exit code, stdout, the store and its artifact records by the types they keep."""
    policy = tmp_path / "strict.yaml"
    policy.write_text(STRICT)
    with cli_home(tmp_path) as (store, _):
        code = main([
            "audit", "--model", str(tiny_llama), "--candidates", candidate, "--search", str(budget),
            "--eval-limit", "4", "--eval-max-new-tokens", "16", "--policy-file", str(policy),
        ])  # fmt: skip
        records = {
            r.recipe.get("keep", ""): r for r in map(lambda a: read_artifact_record(store, a), store.artifact_ids())
        }
    return code, capsys.readouterr().out, store, records


def test_the_search_keeps_the_most_sensitive_layer_types_at_full_precision_one_more_per_step(
    tmp_path, tiny_llama, capsys
):
    """Under a policy no quantized model meets, the search runs its budget: each step a candidate of its own
    that keeps the next most sensitive layer type (as the seed's record ranked them) at fp32, on the record."""
    code, out, store, records = search_under_a_strict_policy(tmp_path, tiny_llama, capsys, "gptq-w4-g64-n8-l64", 2)
    assert code == 3 and "search step 2/2" in out, out
    ranking = records[""].layer_sensitivity
    assert set(ranking) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    first, second = most_sensitive(ranking, 1), most_sensitive(ranking, 2)
    assert set(records) == {"", first, second} and set(first.split(".")) < set(second.split("."))
    step = records[second]
    assert step.layer_sensitivity == ranking and "kept at fp32" in step.precision
    model, _ = load_model(store.artifact_dir(step.artifact_id))
    plain = {n.rsplit(".", 1)[-1] for n, m in model.get_decoder().named_modules() if type(m) is torch.nn.Linear}
    assert plain == set(second.split("."))  # exactly the kept types stayed full precision, in every block
    assert f"kept at full precision in every block: {second.split('.')[0]} (most sensitive #" in out


def test_the_search_from_a_data_free_candidate_keeps_its_most_sensitive_layer_type_out_of_torchao(
    tmp_path, tiny_llama, capsys
):
    """A torchao candidate is measured on its own int8 grid (on calibration text it never read for its bytes);
    the search step keeps the top type as plain fp32 Linear in every block and quantizes everything else."""
    code, out, store, records = search_under_a_strict_policy(tmp_path, tiny_llama, capsys, "torchao-int8-weight", 1)
    assert code == 3 and "search from torchao-int8-weight (nearest to passing)" in out, out
    seed = records[""]
    assert seed.calibration_hash is None and seed.sensitivity_calibration_hash is not None
    kept = most_sensitive(seed.layer_sensitivity, 1)
    step = records[kept]
    assert step.recipe == {"method": "torchao-int8-weight", "keep": kept} and step.artifact_id.startswith(
        "torchao-int8w-"
    )
    model, _ = load_model(store.artifact_dir(step.artifact_id))
    weights = {
        (n.rsplit(".", 1)[-1], type(m.weight).__name__)
        for n, m in model.get_decoder().named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    assert {t for t, w in weights if w == "Parameter"} == {kept}
    assert {w for t, w in weights if t != kept} == {"Int8Tensor"}
