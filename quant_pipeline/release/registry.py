"""The artifact registry as an auditor reads it: one record per artifact, re-verifiable at any time.

The record lives twice — next to the artifact on disk and in the MLflow model registry (tags, and
the record as a run artifact) — and `show`/`verify` read it back. The base checkpoint is never
deleted while an artifact derived from it exists.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import RECORD_FILE, file_hashes, hash_directory
from quant_pipeline.core.paths import EVALS_DIR
from quant_pipeline.core.records import CheckpointRecord, DeltaReportRecord
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.release.evidence import EvidenceError, report_path
from quant_pipeline.release.mlbom import build_mlbom, validate_mlbom, write_mlbom
from quant_pipeline.release.signoff import decisions

if TYPE_CHECKING:  # the class imports MLflow (seconds): read-only verbs run without it
    from quant_pipeline.core.registry_view import RegistryReader


def latest_report(store: ArtifactStore, model_name: str, artifact_id: str) -> Path | None:
    """The delta report of the artifact's latest evaluation in the trail (None before its first one)."""
    try:
        path = report_path(store, model_name, artifact_id)
    except EvidenceError:
        return None
    return path if path.exists() else None


def all_records(store: ArtifactStore | Path) -> list[dict]:
    store = ArtifactStore.of(store)
    return [read_artifact_record(store, aid).dump() for aid in store.artifact_ids()]


def show(store: ArtifactStore | Path, tracker: RegistryReader, artifact_id: str) -> dict:
    """Everything recorded about one artifact: its inputs, scales, eval verdict, registry entry, decisions."""
    store = ArtifactStore.of(store)
    record = read_artifact_record(store, artifact_id)
    mv = tracker.model_version(record.model_name, artifact_id)
    report = latest_report(store, record.model_name, artifact_id)
    return {
        "artifact_id": artifact_id,
        "record": record.model_dump(mode="json", exclude={"scales", "files"}),
        "files": record.files,
        "scales": {"hash": record.scales.hash, "layers": record.scales.layers},
        "registry": {
            "model": record.model_name,
            "version": str(mv.version) if mv else None,
            "tags": dict(mv.tags) if mv else {},
            "aliases": sorted(mv.aliases) if mv else [],
        },
        "delta_report": DeltaReportRecord.read(report).dump() if report is not None else None,
        "decisions": decisions(store, record.model_name, artifact_id),
    }


def dependants(store: ArtifactStore | Path, base_hash: str) -> list[str]:
    return [r["artifact_id"] for r in all_records(store) if r["base_hash"] == base_hash]


def delete_base(store: ArtifactStore | Path, model: str | Path) -> None:
    """Delete a converted base checkpoint, named by model — refused while any artifact derived from it exists.

    A `Path` names a checkpoint directory of the user's own: its dependants are reported, but the
    pipeline never deletes what it did not write."""
    store = ArtifactStore.of(store)
    checkpoint = Path(model) if isinstance(model, Path) else store.checkpoint_dir(model)
    if not checkpoint.is_dir():
        raise AuditInputError(f"no base checkpoint {model} in {store.root / 'checkpoints'}: check the model name")
    record_path = checkpoint / RECORD_FILE
    base_hash = CheckpointRecord.read(record_path).hash if record_path.exists() else hash_directory(checkpoint)
    found = dependants(store, base_hash)
    if found:
        raise AuditInputError(
            f"refusing to delete base checkpoint {checkpoint}: "
            f"artifacts derived from it still exist: {', '.join(found)}"
        )
    if not store.contains(checkpoint):
        raise AuditInputError(
            f"{checkpoint} is not kept by quant_pipeline (outside {store.root}): it is yours to delete"
        )
    shutil.rmtree(checkpoint)


def _base_dir(store: ArtifactStore, record: dict) -> Path:
    """The base checkpoint's folder: where the audit read it, else this store's copy of the registered base (what
    `quant-pipeline pull` fetches on a host that did not run the audit), if it hashes as the record's base."""
    from quant_pipeline.release.reference import base_artifact_id

    if Path(record["base_path"]).is_dir():
        return Path(record["base_path"])
    fetched = store.artifact_dir(base_artifact_id(record["base_hash"]))
    if fetched.is_dir() and hash_directory(fetched) == record["base_hash"]:
        return fetched
    raise AuditInputError(
        f"{record['artifact_id']}: its base checkpoint {record['base_path']} is not on this host: "
        f"`quant-pipeline pull {record['model_name']}` fetches the registered base"
    )


def write_bom(store: ArtifactStore | Path, artifact_id: str) -> Path:
    """The artifact's CycloneDX 1.6 ML-BOM, validated against the official schema, beside its reports."""
    # here, not at the top: they pull in torch and lm-eval, which `show` and `verify` do not need
    from quant_pipeline.evaluation.suite import suite_hash
    from quant_pipeline.models.checkpoint import describe_checkpoint

    store = ArtifactStore.of(store)
    record = read_artifact_record(store, artifact_id).dump()
    source = {"kind": "local", "location": record["base_path"], "name": record["model_name"]}
    base = {"model_name": record["model_name"], "source": source, **describe_checkpoint(_base_dir(store, record))}
    calibration = {"path": "", "hash": record["calibration_hash"], "count": record["calibration_count"]}
    suite = {
        "name": "quant_pipeline golden + behaviour suite",
        "suite_hash": suite_hash(),
        "files": file_hashes(EVALS_DIR),
    }
    report = latest_report(store, record["model_name"], artifact_id)
    import pandas as pd  # only here: `show` answers without it

    table = report.with_name("delta_report.parquet") if report else None
    if table is not None and not table.is_file():
        raise AuditInputError(f"{table}: missing (the verdict's deltas, which the ML-BOM lists): re-run the audit")
    deltas = pd.read_parquet(table).to_dict("records") if table else []
    doc = build_mlbom(record, base, calibration, suite, deltas, decisions(store, record["model_name"], artifact_id))
    validate_mlbom(doc)
    return write_mlbom(doc, store.report_dir(artifact_id) / "mlbom.cdx.json")
