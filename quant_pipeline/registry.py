"""The artifact registry as an auditor reads it: one record per artifact, re-verifiable at any time.

The record lives twice — next to the artifact on disk and in the MLflow model registry (tags, and
the record as a run artifact) — and `show`/`verify` read it back. The base checkpoint is never
deleted while an artifact derived from it exists.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from quant_pipeline.errors import AuditInputError
from quant_pipeline.signoff import artifact_record, decisions
from quant_pipeline.storage import RECORD_FILE, diff_hashes, file_hashes
from quant_pipeline.tracking import MlflowTracker

def all_records(store: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((store / "artifacts").glob(f"*/{RECORD_FILE}"))]

def show(store: Path, tracker: MlflowTracker, artifact_id: str) -> dict:
    """Everything recorded about one artifact: its inputs, scales, eval verdict, registry entry, decisions."""
    record = artifact_record(store, artifact_id)
    version = tracker.find_version(record["model_name"], artifact_id)
    mv = tracker.client().get_model_version(record["model_name"], version) if version else None
    report_path = store / "reports" / artifact_id / "delta_report.json"
    return {
        "artifact_id": artifact_id,
        "record": {k: v for k, v in record.items() if k not in ("scales", "files")},
        "files": record["files"],
        "scales": {"hash": record["scales"]["hash"], "layers": record["scales"]["layers"]},
        "registry": {"model": record["model_name"], "version": version, "tags": dict(mv.tags) if mv else {}, "aliases": list(mv.aliases) if mv else []},
        "delta_report": json.loads(report_path.read_text()) if report_path.exists() else None,
        "decisions": decisions(store, record["model_name"], artifact_id),
    }

def verify(store: Path, artifact_id: str) -> list[str]:
    """Re-hash the artifact's files; the list of problems is empty when they still match the record."""
    directory = store / "artifacts" / artifact_id
    record = artifact_record(store, artifact_id)
    return diff_hashes(record["files"], file_hashes(directory))

def dependants(store: Path, base_hash: str) -> list[str]:
    return [r["artifact_id"] for r in all_records(store) if r["base_hash"] == base_hash]

def delete_base(store: Path, checkpoint: Path) -> None:
    """Delete a converted base checkpoint — refused while any artifact derived from it exists."""
    from quant_pipeline.storage import hash_directory

    if not checkpoint.is_dir():
        raise AuditInputError(f"no base checkpoint at {checkpoint}")
    record_path = checkpoint / RECORD_FILE
    base_hash = json.loads(record_path.read_text())["hash"] if record_path.exists() else hash_directory(checkpoint)
    found = dependants(store, base_hash)
    if found:
        raise AuditInputError(f"refusing to delete base checkpoint {checkpoint}: artifacts derived from it still exist: {', '.join(found)}")
    if store.resolve() not in checkpoint.resolve().parents:
        raise AuditInputError(f"{checkpoint} is not kept by quant_pipeline (outside {store}): it is yours to delete")
    shutil.rmtree(checkpoint)

__all__ = ["all_records", "delete_base", "dependants", "read_entries", "show", "trail_path", "verify", "verify_artifact"]


def write_bom(store: Path, artifact_id: str) -> Path:
    """The artifact's CycloneDX 1.6 ML-BOM, validated against the official schema, beside its reports."""
    import pandas as pd

    from quant_pipeline.base_checkpoint import describe_checkpoint
    from quant_pipeline.eval_results import suite_hash
    from quant_pipeline.mlbom import build_mlbom, validate_mlbom, write_mlbom
    from quant_pipeline.settings import EVALS_DIR

    record = artifact_record(store, artifact_id)
    base = {"model_name": record["model_name"], "source": {"kind": "local", "location": record["base_path"], "name": record["model_name"]}, **describe_checkpoint(Path(record["base_path"]))}
    calibration = {"path": "", "hash": record["calibration_hash"], "count": record["calibration_count"]}
    suite = {"name": "quant_pipeline golden + behaviour suite", "suite_hash": suite_hash(), "files": file_hashes(EVALS_DIR)}
    report = store / "reports" / artifact_id / "delta_report.parquet"
    deltas = pd.read_parquet(report).to_dict("records") if report.exists() else []
    doc = build_mlbom(record, base, calibration, suite, deltas, decisions(store, record["model_name"], artifact_id))
    validate_mlbom(doc)
    return write_mlbom(doc, store / "reports" / artifact_id / "mlbom.cdx.json")
