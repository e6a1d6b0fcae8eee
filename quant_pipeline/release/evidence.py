"""What a sign-off rests on, checked against records held outside the store's folders before anyone acts.

A check that compares a file with a record lying in the same folder proves nothing: whoever can
rewrite the one can rewrite the other. So the verdict an approval rests on is the delta report
whose sha256 the gate wrote into the hash-chained, MLflow-anchored trail, and the bytes an approval
or promotion rests on are the ones whose content hash both the registry version (MLflow) and the
trail's audit entry hold. The trail's readers here (an artifact's decisions, whether it stands approved, the
policy governing its model, its latest evaluation) take ``trail=``, the entries a sign-off verified against
the anchor, so that what it decides on is what it verified (`trail.read_verified`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.records import ArtifactRecord, DeltaReportRecord
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.release.trail import read_entries

if TYPE_CHECKING:  # the class imports MLflow (seconds): read-only verbs run without it
    from quant_pipeline.core.tracking import MlflowTracker


class EvidenceError(AuditInputError):
    """The evidence a decision would rest on does not match what was recorded when it was produced."""


DECISIONS = ("approved", "rejected", "incomplete", "pending sign-off", "revoked")
PINNED = "policy pinned"  # the trail event that sets the policy governing a model (release/governing.py)


def _trail(store: ArtifactStore | Path, model_name: str, trail: list[dict] | None) -> list[dict]:
    """``trail``: the entries a caller verified, to act on them as verified (`signoff.require_intact_trail`); without
    it, the file's entries read now."""
    return trail if trail is not None else read_entries(ArtifactStore.of(store).trail_path(model_name))  # [] if none


def _entries(
    store: ArtifactStore, model_name: str, event: str, artifact_id: str, trail: list[dict] | None = None
) -> list[dict]:
    """The trail's `event` entries of the artifact."""
    return [
        e for e in _trail(store, model_name, trail) if (e.get("event"), e.get("artifact_id")) == (event, artifact_id)
    ]


def decisions_of_model(store: ArtifactStore | Path, model_name: str, trail: list[dict] | None = None) -> list[dict]:
    """Every sign-off decision in the model's trail, oldest first."""
    return [e for e in _trail(store, model_name, trail) if e.get("event") in DECISIONS]


def decisions(
    store: ArtifactStore | Path, model_name: str, artifact_id: str, trail: list[dict] | None = None
) -> list[dict]:
    return [e for e in decisions_of_model(store, model_name, trail) if e.get("artifact_id") == artifact_id]


def is_approved(
    store: ArtifactStore | Path, model_name: str, artifact_id: str, trail: list[dict] | None = None
) -> bool:
    history = decisions(store, model_name, artifact_id, trail)
    latest = [e for e in history if e["event"] != "pending sign-off"]
    return bool(latest) and latest[-1]["event"] == "approved"


def governing_policy(store: ArtifactStore | Path, model_name: str, trail: list[dict] | None = None) -> dict | None:
    """The model's latest `policy pinned` trail entry (None before its first judged audit); see governing.py."""
    pins = [e for e in _trail(store, model_name, trail) if e.get("event") == PINNED]
    return pins[-1] if pins else None


EVAL_TABLES = ("results.parquet", "items.parquet")


def eval_table_hashes(store: ArtifactStore, base_key: str, quantized_key: str) -> dict[str, str]:
    """sha256 of each eval table a verdict was computed from, named `<label>/<file>` (what the trail holds)."""
    keys = {"base": base_key, "quantized": quantized_key}
    return {
        f"{label}/{name}": sha256_file(store.eval_dir(key) / name)
        for label, key in keys.items()
        for name in EVAL_TABLES
    }


def latest_evaluation(store: ArtifactStore, model_name: str, artifact_id: str, trail: list[dict] | None = None) -> dict:
    evaluated = _entries(store, model_name, "evaluated", artifact_id, trail)
    if not evaluated:
        raise EvidenceError(f"artifact {artifact_id} has no evaluation in the trail of {model_name}: run the audit")
    return evaluated[-1]


def gate_failures(
    store: ArtifactStore, model_name: str, artifact_id: str, trail: list[dict] | None = None
) -> list[dict]:
    """Every evaluation of the artifact the gate judged FAIL: one is enough to make it unapprovable."""
    return [
        e
        for e in _entries(store, model_name, "evaluated", artifact_id, trail)
        if e.get("verdict", "PASS" if e.get("passed") else "FAIL") == "FAIL"
    ]


def report_path(store: ArtifactStore, model_name: str, artifact_id: str, trail: list[dict] | None = None) -> Path:
    """The delta report of the artifact's latest evaluation in the trail."""
    return _report_of(store, artifact_id, latest_evaluation(store, model_name, artifact_id, trail))


def _report_of(store: ArtifactStore, artifact_id: str, entry: dict) -> Path:
    if not entry.get("report_key") or not entry.get("report_sha256"):
        raise EvidenceError(
            f"the trail's evaluation of {artifact_id} names no report key or hash (written by an older version): "
            "re-run the audit"
        )
    return store.delta_report_dir(artifact_id, entry["report_key"]) / "delta_report.json"


def judged_report(
    store: ArtifactStore, model_name: str, artifact_id: str, trail: list[dict] | None = None
) -> DeltaReportRecord:
    """The delta report as the gate judged it: its bytes, and the eval tables it was computed from, must
    hash to what the latest evaluation in the trail recorded, so a `"passed": true` typed into the file
    (or a doctored results table) is refused, not believed."""
    entry = latest_evaluation(store, model_name, artifact_id, trail)
    path = _report_of(store, artifact_id, entry)
    if not path.exists() or sha256_file(path) != entry["report_sha256"]:
        raise EvidenceError(
            f"{path} is not the report the gate judged (sha256 {entry['report_sha256'][:12]} in the trail): "
            "it was edited or removed; re-run the audit"
        )
    record = DeltaReportRecord.read(path)
    held = entry.get("eval_tables") or {}
    now = eval_table_hashes(store, record.base_eval_key, record.eval_key) if held else {}
    changed = sorted(name for name, digest in held.items() if now.get(name) != digest)
    if not held or changed:
        what = f"eval table(s) {', '.join(changed)} changed since" if changed else "no eval table hashes for"
        raise EvidenceError(f"{what} the verdict on {artifact_id} was recorded: re-run the audit")
    return record


def verified_bytes(
    store: ArtifactStore, tracker: MlflowTracker, artifact_id: str, trail: list[dict] | None = None
) -> ArtifactRecord:
    """The artifact re-hashed now, and its content hash matched with the registry version's and the
    trail's: rewriting the files and the record beside them together is caught here."""
    record = verify_artifact(store, artifact_id)  # the files match the record lying beside them
    mv = tracker.model_version(record.model_name, artifact_id)
    audits = _entries(store, record.model_name, "audit", artifact_id, trail)
    held = {
        "the MLflow registry": mv.tags.get("content_hash") if mv is not None else None,
        "the trail": next((e.get("content_hash") for e in reversed(audits)), None),
    }
    for holder, digest in held.items():
        if digest != record.content_hash:
            raise EvidenceError(
                f"artifact {artifact_id} hashes to {record.content_hash[:12]} but {holder} holds "
                f"{(digest or 'nothing')[:12]}: its files and record were rewritten; rebuild it with the audit"
            )
    return record
