"""An approval carried over to byte-identical weights: a new artifact ID is not new bytes.

A changed input that does not reach the bytes (a recipe field the method ignores at these settings, a
calibration file edited outside the samples used, a runtime upgrade that quantizes the same) gives a new
artifact ID and registry version whose weights are those of an approved artifact. Asking a person to sign
them off again teaches people to sign without looking; so the approval carries over, as its own trail
entry that says what changed (the audit entries' inputs that differ) and what did not (the weights'
sha256), once the new version has passed its own audit under the governing policy.

An adversary who can write the store must not be able to make bytes look approved. So nothing read here is
a field someone can edit unseen: the new bytes are re-hashed now and matched with the registry's and the
trail's content hash (`evidence.verified_bytes`); the approved content hash, the base and the approval's
standing come from the trail after it is verified against its MLflow anchor.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.records import Decision
from quant_pipeline.core.registry_view import APPROVED_ALIAS
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.release.evidence import (
    decisions_of_model,
    gate_failures,
    governing_policy,
    is_approved,
    judged_report,
    report_path,
    verified_bytes,
)
from quant_pipeline.release.signoff import artifact_record, record_event, require_intact_trail

if TYPE_CHECKING:
    from quant_pipeline.core.tracking import MlflowTracker

INPUTS = ("recipe", "calibration_hash", "calibration_file_hash", "runtime_hash", "base_hash")


def _last_audit(entries: list[dict], artifact_id: str) -> dict:
    return next((e for e in reversed(entries) if e.get("event") == "audit" and e.get("artifact_id") == artifact_id), {})


def carry_approval(
    store: ArtifactStore | Path, tracker: MlflowTracker, artifact_id: str, dagster_run_id: str | None = None
) -> dict | None:
    """Approve ``artifact_id`` on the standing approval of an artifact of the same model and base whose
    approved weights hash the same; None when there is none (or it is approved already, or its own audit
    did not PASS under the governing policy): the caller then records what it would have."""
    store = ArtifactStore.of(store)
    model_name = artifact_record(store, artifact_id).model_name
    # every trail fact below comes from this one verified read (trail.read_verified says why)
    trail = require_intact_trail(store, tracker, model_name, f"carry an approval over to {artifact_id}")
    if is_approved(store, model_name, artifact_id, trail) or gate_failures(store, model_name, artifact_id, trail):
        return None
    report = judged_report(store, model_name, artifact_id, trail)  # its own verdict, as the trail recorded it
    governing = (governing_policy(store, model_name, trail) or {}).get("policy_hash")
    if report.verdict != "PASS" or report.policy_hash != governing:
        return None
    record = verified_bytes(store, tracker, artifact_id, trail)  # re-hashed now, matched with MLflow's and the trail's
    mine = _last_audit(trail, artifact_id)
    source = next(
        (
            e
            for e in reversed(decisions_of_model(store, model_name, trail))
            if e["event"] == "approved"
            and e["artifact_id"] != artifact_id
            and e.get("content_hash") == record.content_hash
            and _last_audit(trail, e["artifact_id"]).get("base_hash") == record.base_hash == mine.get("base_hash")
            and is_approved(store, model_name, e["artifact_id"], trail)
        ),
        None,
    )
    if source is None:
        return None
    theirs = _last_audit(trail, source["artifact_id"])
    changed = {k: {"from": theirs.get(k), "to": mine.get(k)} for k in INPUTS if theirs.get(k) != mine.get(k)}
    version = tracker.find_version(model_name, artifact_id)
    what = ", ".join(changed) or "the artifact ID only"
    note = (
        f"approval of {source['artifact_id']} (v{source['registry_version']}, by {source['by']}) carried over: "
        f"changed {what}; unchanged: the weights, sha256 {record.content_hash}, re-hashed now"
    )
    decision = Decision(
        event="approved", artifact_id=artifact_id, registry_version=version, content_hash=record.content_hash,
        by=f"{source['by']} (carried over by quant_pipeline)", note=note, policy_hash=report.policy_hash,
        report_sha256=sha256_file(report_path(store, model_name, artifact_id, trail)), dagster_run_id=dagster_run_id,
    )  # fmt: skip
    entry = record_event(
        store, tracker, model_name,
        {**decision.model_dump(mode="json"), "carried_from": source["artifact_id"], "changed": changed},
    )  # fmt: skip
    tracker.set_version_tags(model_name, version, {
        "approval": "approved (carried over)", "approver": source["by"], "approved_content_hash": record.content_hash,
        "carried_from": source["artifact_id"], "approval_note": note[:4000],
    })  # fmt: skip
    tracker.set_alias(model_name, APPROVED_ALIAS, version)
    return entry
