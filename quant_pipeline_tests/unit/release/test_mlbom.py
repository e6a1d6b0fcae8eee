"""The CycloneDX 1.6 ML-BOM: built from records, validated against the official schema."""

import copy
import json

import pytest

from quant_pipeline.release.mlbom import build_mlbom, validate_mlbom, write_mlbom

SHA = {
    k: (c * 64)
    for k, c in zip(
        ("base", "content", "calib", "suite", "runtime", "scales", "f1", "f2", "f3", "e1", "e2"),
        "0123456789a",
        strict=True,
    )
}


@pytest.fixture
def records():
    artifact = {
        "artifact_id": "gptq-w4g64-0123456789ab",
        "model_name": "SmolLM2-135M-Instruct",
        "base_hash": SHA["base"],
        "base_path": "/store/checkpoints/SmolLM2-135M-Instruct",
        "recipe": {
            "method": "gptq",
            "bits": 4,
            "group_size": 64,
            "desc_act": False,
            "sym": True,
            "damp_percent": 0.01,
            "calibration_samples": 128,
            "seq_len": 512,
        },
        "calibration_hash": SHA["calib"],
        "calibration_count": 128,
        "runtime_hash": SHA["runtime"],
        "runtime": {
            "python": "3.11.9",
            "platform": "Linux-6.8.0-x86_64-with-glibc2.39",
            "machine": "x86_64",
            "libraries": {
                "torch": "2.8.0",
                "transformers": "4.57.1",
                "optimum": "2.0.0",
                "gptqmodel": "5.0.0",
                "lm_eval": "0.4.9",
                "accelerate": "1.10.1",
                "safetensors": "0.6.2",
                "numpy": "2.3.3",
            },
            "cpu": {"model": "Intel(R) Xeon(R) Platinum 8480+", "isa": ["avx2", "avx512f", "amx_int8"]},
            "gpu": None,
        },
        "precision": "int4 weights (GPTQ, group 64), fp32 activations",
        "scales": {
            "hash": SHA["scales"],
            "layers": 2,
            "per_layer": {
                "model.layers.0.self_attn.q_proj": {
                    "scales": {"mean": 0.0123, "min": 0.001, "max": 0.09},
                    "qzeros": {"mean": 7.5, "min": 7.0, "max": 8.0},
                },
                "model.layers.0.mlp.down_proj": {
                    "scales": {"mean": 0.0211, "min": 0.002, "max": 0.13},
                    "qzeros": {"mean": 7.5, "min": 7.0, "max": 8.0},
                },
            },
        },
        "files": {"config.json": SHA["f1"], "model.safetensors": SHA["f2"], "tokenizer.json": SHA["f3"]},
        "content_hash": SHA["content"],
        "size_bytes": 104_857_600,
        "dagster_run_id": "run-1",
    }
    base = {
        "model_name": "SmolLM2-135M-Instruct",
        "hash": SHA["base"],
        "architecture": "LlamaForCausalLM",
        "num_parameters": 134_515_008,
        "dtype": "F32",
        "size_bytes": 538_090_408,
        "path": "/store/checkpoints/SmolLM2-135M-Instruct",
        "source": {
            "kind": "gguf",
            "location": "/models/smollm2",
            "name": "SmolLM2-135M-Instruct",
            "gguf_file": "smollm2.gguf",
        },
    }
    calibration = {"path": "/store/calibration/calib.jsonl", "hash": SHA["calib"], "count": 128}
    eval_suite = {
        "name": "quant_pipeline-evals",
        "suite_hash": SHA["suite"],
        "files": {"tasks/arc.yaml": SHA["e1"], "data/refusal.jsonl": SHA["e2"]},
    }
    deltas = [
        {
            "category": "reasoning",
            "metric": "acc",
            "base": 0.42,
            "quantized": 0.40,
            "delta": -0.02,
            "ci_low": -0.05,
            "ci_high": 0.01,
            "passed": True,
        },
        {
            "category": "knowledge",
            "metric": "acc",
            "base": 0.35,
            "quantized": 0.33,
            "delta": -0.02,
            "ci_low": -0.04,
            "ci_high": 0.0,
            "passed": True,
        },
        {
            "category": "should_refuse",
            "metric": "refusal_rate",
            "base": 0.9,
            "quantized": 0.85,
            "delta": -0.05,
            "ci_low": -0.1,
            "ci_high": 0.0,
            "passed": True,
        },
        {
            "category": "agreement",
            "metric": "top1_agreement",
            "base": 1.0,
            "quantized": 0.93,
            "delta": -0.07,
            "ci_low": -0.09,
            "ci_high": -0.05,
            "passed": False,
        },
    ]
    approvals = [
        {
            "artifact_id": artifact["artifact_id"],
            "decision": "pending sign-off",
            "approver": None,
            "at": "2024-05-01T10:00:00+00:00",
            "seq": 0,
            "hash": SHA["e1"],
        },
        {
            "artifact_id": artifact["artifact_id"],
            "decision": "approved",
            "approver": "alice",
            "at": "2024-05-02T10:00:00+00:00",
            "seq": 1,
            "hash": SHA["e2"],
        },
    ]
    return artifact, base, calibration, eval_suite, deltas, approvals


def _props(component):
    return {p["name"]: p["value"] for p in component["properties"]}


def test_bom_from_sample_records_validates_against_official_1_6_schema(records, tmp_path):
    doc = build_mlbom(*records)
    validate_mlbom(doc)
    assert doc["bomFormat"] == "CycloneDX" and doc["specVersion"] == "1.6" and doc["version"] == 1
    assert doc["serialNumber"] == build_mlbom(*records)["serialNumber"]  # derived from content, not random
    assert doc["serialNumber"].startswith("urn:uuid:")
    assert doc["metadata"]["tools"]["components"][0]["name"] == "quant_pipeline"
    out = write_mlbom(doc, tmp_path / "bom" / "mlbom.cdx.json")
    assert json.loads(out.read_text()) == doc


def test_bom_describes_model_with_base_as_pedigree_ancestor(records):
    artifact, base = records[0], records[1]
    model = build_mlbom(*records)["metadata"]["component"]
    assert model["type"] == "machine-learning-model"
    assert model["bom-ref"] == model["version"] == artifact["artifact_id"]
    assert model["hashes"] == [{"alg": "SHA-256", "content": artifact["content_hash"]}]
    (ancestor,) = model["pedigree"]["ancestors"]
    assert ancestor["type"] == "machine-learning-model" and ancestor["name"] == base["model_name"]
    assert ancestor["hashes"] == [{"alg": "SHA-256", "content": base["hash"]}]
    assert {c["name"]: c["hashes"][0]["content"] for c in model["components"]} == artifact["files"]
    params = model["modelCard"]["modelParameters"]
    assert params["task"] == "text-generation" and params["modelArchitecture"] == "LlamaForCausalLM"


def test_bom_lists_calibration_and_eval_suite_as_data_components(records):
    _, _, calibration, eval_suite, _, _ = records
    doc = build_mlbom(*records)
    data = {c["bom-ref"]: c for c in doc["components"]}
    assert all(c["type"] == "data" and c["data"][0]["type"] == "dataset" for c in data.values())
    assert sorted(c["hashes"][0]["content"] for c in data.values()) == sorted(
        [calibration["hash"], eval_suite["suite_hash"]]
    )
    assert all(c["hashes"][0]["alg"] == "SHA-256" for c in data.values())
    model = doc["metadata"]["component"]
    assert {d["ref"] for d in model["modelCard"]["modelParameters"]["datasets"]} == set(data)
    assert {"ref": model["bom-ref"], "dependsOn": sorted(data, key=lambda r: not r.startswith("calibration"))} in doc[
        "dependencies"
    ]


def test_bom_records_quantization_params_runtime_versions_scales_and_approvals(records):
    artifact = records[0]
    props = _props(build_mlbom(*records)["metadata"]["component"])
    assert props["quant_pipeline:recipe:bits"] == "4"
    assert props["quant_pipeline:recipe:group_size"] == "64"
    assert props["quant_pipeline:recipe:desc_act"] == "false"
    assert props["quant_pipeline:recipe:damp_percent"] == "0.01"
    assert props["quant_pipeline:runtime:torch"] == "2.8.0"
    assert props["quant_pipeline:runtime:gptqmodel"] == "5.0.0"
    assert props["quant_pipeline:runtime:python"] == "3.11.9"
    assert props["quant_pipeline:runtime:cpu:isa"] == "avx2,avx512f,amx_int8"
    assert props["quant_pipeline:scales:hash"] == artifact["scales"]["hash"]
    for layer, stats in artifact["scales"]["per_layer"].items():
        assert json.loads(props[f"quant_pipeline:scales:per_layer:{layer}"]) == stats
    assert props["quant_pipeline:approval:count"] == "2"
    assert props["quant_pipeline:approval:latest:decision"] == "approved"
    assert json.loads(props["quant_pipeline:approval:1"])["approver"] == "alice"
    assert props["quant_pipeline:delta:agreement:top1_agreement:passed"] == "false"


def test_bom_has_per_slice_metrics_with_confidence_intervals(records):
    deltas = records[4]
    metrics = build_mlbom(*records)["metadata"]["component"]["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]
    for row in deltas:
        (value,) = [m for m in metrics if m["type"] == row["metric"] and m["slice"] == row["category"]]
        assert float(value["value"]) == row["quantized"]
        (delta,) = [
            m for m in metrics if m["type"] == f"{row['metric']}:delta_vs_base" and m["slice"] == row["category"]
        ]
        assert float(delta["value"]) == row["delta"]
        assert delta["confidenceInterval"] == {"lowerBound": str(row["ci_low"]), "upperBound": str(row["ci_high"])}


def test_bom_without_ci_or_approvals_still_validates(records):
    artifact, base, calibration, eval_suite, deltas, _ = records
    deltas = [{k: v for k, v in r.items() if k not in ("ci_low", "ci_high")} for r in deltas] + [
        {
            "category": "tool_call",
            "metric": "tool_call_validity",
            "base": float("nan"),
            "quantized": float("nan"),
            "delta": float("nan"),
            "ci_low": float("nan"),
            "ci_high": float("nan"),
        }
    ]
    doc = build_mlbom(artifact, base, calibration, eval_suite, deltas)
    validate_mlbom(doc)
    metrics = doc["metadata"]["component"]["modelCard"]["quantitativeAnalysis"]["performanceMetrics"]
    assert not any("confidenceInterval" in m for m in metrics)


def test_broken_bom_fails_validation_with_path(records):
    doc = build_mlbom(*records)
    broken = copy.deepcopy(doc)
    broken["metadata"]["component"]["type"] = "model"
    with pytest.raises(ValueError, match=r"metadata\.component\.type.*'model' is not one of"):
        validate_mlbom(broken)
    broken = copy.deepcopy(doc)
    broken["components"][0]["data"][0]["type"] = "corpus"
    with pytest.raises(ValueError, match=r"components\[0\]\.data\[0\]\.type"):
        validate_mlbom(broken)
    broken = copy.deepcopy(doc)
    broken["dependencies"][0]["dependsOn"].append("nowhere")
    with pytest.raises(ValueError, match="unknown bom-ref 'nowhere'"):
        validate_mlbom(broken)
