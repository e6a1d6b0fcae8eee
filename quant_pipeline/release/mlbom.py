"""ML bill of materials for a quantized artifact, as a CycloneDX 1.6 JSON document.

An ML-BOM answers, in a standard format other tools read, "what exactly is this model and what
went into it": the quantized model (with the hash of its files), the base model it derives from
(pedigree), the calibration data that shaped its scales and the eval suite that judged it (data
components with their hashes), every quantization parameter and runtime version (properties), the
measured per-slice quality against the base (model card metrics) and the approval history.

The document is built as a plain dict (the shape is visible here, and cyclonedx-python-lib has no
model-card support) and checked against the official CycloneDX 1.6 JSON schema that ships inside
cyclonedx-python-lib (`cyclonedx/schema/_res/bom-1.6.SNAPSHOT.schema.json`, with its bundled
spdx/jsf/cryptography-defs schemas; no network).
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import math
import uuid
from collections import Counter
from pathlib import Path

from quant_pipeline.core.store import write_text_atomic

SPEC_VERSION = "1.6"
SCHEMA_URL = "http://cyclonedx.org/schema/bom-1.6.schema.json"
PREFIX = "quant_pipeline"
# uuid5 namespace for serial numbers: the same artifact content always gets the same BOM serial.
SERIAL_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://quant-pipeline/mlbom")
TREE_HASH_SCHEME = "sha256 over the JSON (sorted keys) of {relative path: sha256 of file}"


def _text(value: object) -> str:
    """Property values are strings: keep strings as they are, write everything else as JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": a not-measured value, stated rather than dropped
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _number(value: object) -> str:
    if value is None:
        return "nan"
    try:
        return str(float(value)) if not isinstance(value, (int, bool)) else str(value)
    except (TypeError, ValueError):
        return str(value)


def _finite(value: object) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _prop(name: str, value: object) -> dict:
    return {"name": f"{PREFIX}:{name}", "value": _text(value)}


def _sha256(content: str) -> list[dict]:
    return [{"alg": "SHA-256", "content": content}]


def _file_components(owner_ref: str, files: dict[str, str]) -> list[dict]:
    return [
        {"type": "file", "bom-ref": f"{owner_ref}:file:{rel}", "name": rel, "hashes": _sha256(digest)}
        for rel, digest in sorted(files.items())
    ]


def _tool_version() -> str:
    try:
        return importlib.metadata.version("quant_pipeline")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _base_component(base: dict, deltas: list[dict]) -> dict:
    ref = f"base:{base['model_name']}@{base['hash'][:16]}"
    source = base.get("source") or {}
    props = [
        _prop("base:hash", base["hash"]),
        _prop("base:hash_scheme", TREE_HASH_SCHEME),
        _prop("base:architecture", base.get("architecture")),
        _prop("base:num_parameters", base.get("num_parameters")),
        _prop("base:dtype", base.get("dtype")),
        _prop("base:size_bytes", base.get("size_bytes")),
        _prop("base:path", base.get("path")),
    ] + [_prop(f"base:source:{k}", v) for k, v in sorted(source.items()) if v is not None]
    return {
        "type": "machine-learning-model",
        "bom-ref": ref,
        "name": base["model_name"],
        "version": base["hash"][:16],
        "hashes": _sha256(base["hash"]),
        "properties": props,
        "modelCard": {
            "modelParameters": {
                "task": "text-generation",
                "architectureFamily": "transformer",
                "modelArchitecture": str(base.get("architecture")),
            },
            # the same slices measured on the base model: the reference the quantized values are judged against
            "quantitativeAnalysis": {
                "performanceMetrics": [
                    {"type": str(r["metric"]), "value": _number(r.get("base")), "slice": str(r["category"])}
                    for r in deltas
                ]
            },
        },
    }


def _data_component(
    ref: str, name: str, digest: str, description: str, props: list[dict], files: dict[str, str] | None = None
) -> dict:
    component = {
        "type": "data",
        "bom-ref": ref,
        "name": name,
        "version": digest[:16],
        "hashes": _sha256(digest),
        "data": [{"type": "dataset", "name": name, "description": description, "contents": {"properties": props}}],
    }
    if files:
        component["components"] = _file_components(ref, files)
    return component


def _performance_metrics(deltas: list[dict]) -> list[dict]:
    """Per slice: the quantized model's value, and its delta to the base with the delta's CI.

    The CI in a delta row is the paired-bootstrap interval of (quantized - base), not of the
    quantized value itself, so it is attached to the delta metric, where it is true.
    """
    metrics = []
    for r in deltas:
        metric, category = str(r["metric"]), str(r["category"])
        metrics.append({"type": metric, "value": _number(r.get("quantized")), "slice": category})
        delta = {"type": f"{metric}:delta_vs_base", "value": _number(r.get("delta")), "slice": category}
        if _finite(r.get("ci_low")) and _finite(r.get("ci_high")):
            delta["confidenceInterval"] = {"lowerBound": _number(r["ci_low"]), "upperBound": _number(r["ci_high"])}
        metrics.append(delta)
    return metrics


def _model_properties(artifact: dict, deltas: list[dict], approvals: list[dict]) -> list[dict]:
    runtime = artifact.get("runtime") or {}
    scales = artifact.get("scales") or {}
    props = [
        _prop("artifact_id", artifact["artifact_id"]),
        _prop("content_hash", artifact["content_hash"]),
        _prop("content_hash_scheme", TREE_HASH_SCHEME),
        _prop("size_bytes", artifact.get("size_bytes")),
        _prop("precision", artifact.get("precision")),
        _prop("base_hash", artifact["base_hash"]),
        _prop("calibration:hash", artifact.get("calibration_hash")),
        _prop("calibration:count", artifact.get("calibration_count")),
    ]
    props += [_prop(f"recipe:{k}", v) for k, v in sorted((artifact.get("recipe") or {}).items())]
    props += [_prop(f"sensitivity:{k}", v) for k, v in sorted((artifact.get("layer_sensitivity") or {}).items())]
    if artifact.get("layer_sensitivity"):
        props.append(_prop("sensitivity:calibration_hash", artifact.get("sensitivity_calibration_hash")))
    props.append(_prop("runtime:hash", artifact.get("runtime_hash")))
    props += [_prop(f"runtime:{k}", runtime[k]) for k in ("python", "platform", "machine") if k in runtime]
    props += [_prop(f"runtime:{lib}", version) for lib, version in sorted((runtime.get("libraries") or {}).items())]
    cpu = runtime.get("cpu") or {}
    if cpu:
        props += [
            _prop("runtime:cpu:model", cpu.get("model")),
            _prop("runtime:cpu:isa", ",".join(cpu.get("isa") or [])),
        ]
    gpu = runtime.get("gpu")
    props += [_prop(f"runtime:gpu:{k}", v) for k, v in sorted(gpu.items())] if gpu else [_prop("runtime:gpu", "none")]
    props += [_prop("scales:hash", scales.get("hash")), _prop("scales:layers", scales.get("layers"))]
    # one property per quantized layer: {"qzeros": {mean,min,max}, "scales": {mean,min,max}} as JSON
    props += [
        _prop(f"scales:per_layer:{layer}", stats) for layer, stats in sorted((scales.get("per_layer") or {}).items())
    ]
    for r in deltas:
        if "passed" in r:
            props.append(_prop(f"delta:{r['category']}:{r['metric']}:passed", bool(r["passed"])))
        if r.get("mode"):  # a gated row: its status and why (regression, within, not measurable, uninformative, waived)
            status = f"{r['status']}: {r['reason']}" if r.get("reason") else r["status"]
            props.append(_prop(f"delta:{r['category']}:{r['metric']}:status", status))
    props.append(_prop("approval:count", len(approvals)))
    for i, entry in enumerate(approvals):
        props.append(_prop(f"approval:{i}", entry))  # the whole entry (decision, approver, at, chain hashes) as JSON
    if approvals:
        props.append(_prop("approval:latest:decision", approvals[-1].get("decision") or approvals[-1].get("event")))
    return props


def build_mlbom(
    artifact: dict,
    base: dict,
    calibration: dict,
    eval_suite: dict,
    deltas: list[dict],
    approvals: list[dict] | None = None,
    *,
    timestamp: str | None = None,
) -> dict:
    """The CycloneDX 1.6 ML-BOM of one quantized artifact (see the module docstring for what is in it).

    ``timestamp`` (ISO-8601) defaults to now; pass one to rebuild a byte-identical document.
    """
    approvals = list(approvals or [])
    aid = artifact["artifact_id"]
    calibrated = bool(calibration.get("hash"))  # a data-free method (torchao, identity) read no calibration set
    calib_ref = f"calibration:{calibration['hash'][:16]}" if calibrated else ""
    eval_ref = f"eval-suite:{eval_suite['name']}:{eval_suite['suite_hash'][:16]}"
    recipe = artifact.get("recipe") or {}

    calibration_component = calibrated and _data_component(
        calib_ref,
        f"{artifact['model_name']} calibration set",
        calibration["hash"],
        f"Calibration texts ({calibration.get('count')} samples); they determine the quantization scales.",
        [
            _prop("path", calibration.get("path")),
            _prop("count", calibration.get("count")),
            _prop("role", "calibration"),
        ],
    )
    eval_component = _data_component(
        eval_ref,
        str(eval_suite["name"]),
        eval_suite["suite_hash"],
        "Evaluation suite the quantized model was compared against its base on, per slice.",
        [
            _prop("role", "evaluation"),
            _prop("hash_scheme", TREE_HASH_SCHEME),
            _prop("files", len(eval_suite.get("files") or {})),
        ],
        eval_suite.get("files") or {},
    )

    size, base_size = artifact.get("size_bytes"), base.get("size_bytes")
    tradeoff = f"Size {size} bytes vs {base_size} bytes for the base"
    if size and base_size:
        tradeoff += f" ({size / base_size:.3f}x)"
    model = {
        "type": "machine-learning-model",
        "bom-ref": aid,
        "name": artifact["model_name"],
        "version": aid,
        "description": (
            f"{artifact['model_name']} quantized with {recipe.get('method', 'gptq').upper()}: "
            f"{artifact.get('precision', '')}"
        ).rstrip(": "),
        "hashes": _sha256(artifact["content_hash"]),
        "pedigree": {
            "ancestors": [_base_component(base, deltas)],
            "notes": "Post-training quantization of the base model; no weights were trained.",
        },
        "components": _file_components(aid, artifact.get("files") or {}),
        "properties": _model_properties(artifact, deltas, approvals),
        "modelCard": {
            "modelParameters": {
                "approach": {"type": "self-supervised"},  # the base LLM's learning approach; GPTQ adds no training
                "task": "text-generation",
                "architectureFamily": "transformer",
                "modelArchitecture": str(base.get("architecture")),
                "datasets": [{"ref": ref} for ref in (calib_ref, eval_ref) if ref],
            },
            "quantitativeAnalysis": {"performanceMetrics": _performance_metrics(deltas)},
            "considerations": {
                "technicalLimitations": [
                    f"{artifact.get('precision') or 'Quantized weights'}; "
                    "quality was measured against the base only on the slices listed in quantitativeAnalysis."
                ],
                "performanceTradeoffs": [tradeoff],
            },
        },
    }
    if not model["components"]:
        del model["components"]

    return {
        "$schema": SCHEMA_URL,
        "bomFormat": "CycloneDX",
        "specVersion": SPEC_VERSION,
        "serialNumber": uuid.uuid5(SERIAL_NAMESPACE, artifact["content_hash"]).urn,
        "version": 1,
        "metadata": {
            "timestamp": timestamp or dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
            "tools": {"components": [{"type": "application", "name": "quant_pipeline", "version": _tool_version()}]},
            "component": model,
        },
        "components": [c for c in (calibration_component, eval_component) if c],
        "dependencies": [
            {"ref": aid, "dependsOn": [ref for ref in (calib_ref, eval_ref) if ref]},
            *({"ref": ref, "dependsOn": []} for ref in (calib_ref, eval_ref) if ref),
        ],
    }


def _bom_refs(node: object) -> list[str]:
    refs = []
    if isinstance(node, dict):
        if isinstance(node.get("bom-ref"), str):
            refs.append(node["bom-ref"])
        for value in node.values():
            refs += _bom_refs(value)
    elif isinstance(node, list):
        for value in node:
            refs += _bom_refs(value)
    return refs


def validate_mlbom(doc: dict) -> None:
    """Raise ValueError unless ``doc`` is a valid CycloneDX 1.6 JSON BOM.

    Schema validation uses the official 1.6 schema bundled with cyclonedx-python-lib (offline).
    The schema does not pin `specVersion` nor check references, so this also requires
    specVersion "1.6", unique bom-refs, and dependency refs that name a bom-ref in the document.
    """
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator
    from jsonschema.exceptions import best_match

    try:
        text = json.dumps(doc, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"BOM is not valid JSON: {e}") from e
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is not None:
        err = error.data
        if getattr(err, "context", None):  # oneOf/anyOf: report the branch that came closest
            err = best_match(err.context)
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err.absolute_path)
        message = err.message if len(err.message) <= 300 else err.message[:300] + "…"
        raise ValueError(f"BOM fails the CycloneDX 1.6 schema at {where}: {message}")
    if doc.get("specVersion") != SPEC_VERSION:
        raise ValueError(f"BOM specVersion is {doc.get('specVersion')!r}, expected {SPEC_VERSION!r}")
    refs = _bom_refs(doc)
    duplicates = sorted(r for r, n in Counter(refs).items() if n > 1)
    if duplicates:
        raise ValueError(f"BOM has duplicate bom-refs: {', '.join(duplicates)}")
    known = set(refs)
    for i, dep in enumerate(doc.get("dependencies") or []):
        for ref in [dep["ref"], *dep.get("dependsOn", [])]:
            if ref not in known:
                raise ValueError(f"BOM dependency at $.dependencies[{i}] names unknown bom-ref {ref!r}")


def write_mlbom(doc: dict, path: Path) -> Path:
    """Write the BOM as indented JSON, atomically (a reader never sees half a document)."""
    return write_text_atomic(Path(path), json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
