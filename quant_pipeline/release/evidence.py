"""What a sign-off rests on, checked against records held outside the store's folders before anyone acts.

A check that compares a file with a record lying in the same folder proves nothing: whoever can
rewrite the one can rewrite the other. So the verdict an approval rests on is the delta report
whose sha256 the gate wrote into the hash-chained, MLflow-anchored trail, and the bytes an approval
or promotion rests on are the ones whose content hash both the registry version (MLflow) and the
trail's audit entry hold.
"""

from __future__ import annotations

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.records import ArtifactRecord, DeltaReportRecord
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.release.trail import read_entries


class EvidenceError(AuditInputError):
    """The evidence a decision would rest on does not match what was recorded when it was produced."""


def _entries(store: ArtifactStore, model_name: str, event: str, artifact_id: str) -> list[dict]:
    return [
        e
        for e in read_entries(store.trail_path(model_name))
        if e.get("event") == event and e.get("artifact_id") == artifact_id
    ]


def report_path(store: ArtifactStore, artifact_id: str):
    return store.report_dir(artifact_id) / "delta_report.json"


def judged_report(store: ArtifactStore, model_name: str, artifact_id: str) -> DeltaReportRecord:
    """The delta report as the gate judged it: its bytes must hash to what the latest evaluation in the
    trail recorded, so a `"passed": true` typed into the file is refused, not believed."""
    evaluated = _entries(store, model_name, "evaluated", artifact_id)
    if not evaluated:
        raise EvidenceError(f"artifact {artifact_id} has no evaluation in the trail of {model_name}: run the audit")
    path = report_path(store, artifact_id)
    recorded = evaluated[-1].get("report_sha256")
    if recorded is None:
        raise EvidenceError(
            f"the trail's evaluation of {artifact_id} names no report hash (written before reports were hashed): "
            "re-run delta_report"
        )
    if not path.exists() or sha256_file(path) != recorded:
        raise EvidenceError(
            f"{path} is not the report the gate judged (sha256 {recorded[:12]} in the trail): it was edited or "
            "removed; re-run delta_report"
        )
    return DeltaReportRecord.read(path)


def verified_bytes(store: ArtifactStore, tracker: MlflowTracker, artifact_id: str) -> ArtifactRecord:
    """The artifact re-hashed now, and its content hash matched with the registry version's and the
    trail's: rewriting the files and the record beside them together is caught here."""
    record = verify_artifact(store, artifact_id)  # the files match the record lying beside them
    mv = tracker.model_version(record.model_name, artifact_id)
    held = {
        "the MLflow registry": mv.tags.get("content_hash") if mv is not None else None,
        "the trail": next(
            (e.get("content_hash") for e in reversed(_entries(store, record.model_name, "audit", artifact_id))), None
        ),
    }
    for holder, digest in held.items():
        if digest != record.content_hash:
            raise EvidenceError(
                f"artifact {artifact_id} hashes to {record.content_hash[:12]} but {holder} holds "
                f"{(digest or 'nothing')[:12]}: its files and record were rewritten; rebuild it with the audit"
            )
    return record
