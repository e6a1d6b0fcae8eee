"""Revocation: an approval stands only while the artifact keeps passing its audits.

When a later audit of an approved artifact (a periodic re-audit, a runtime upgrade, a stricter
policy) does not pass, the approval is revoked by the pipeline itself: `approved` and `production`
move off the version (to the previous approved version, or for `production` to the kept base), the
version's tag says "revoked" with the reason, and the trail records it with what moved where. A
person can approve it again only through a new passing audit.
"""

from __future__ import annotations

from pathlib import Path

from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.records import Decision
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import APPROVED_ALIAS, MlflowTracker
from quant_pipeline.release.evidence import decisions_of_model, is_approved
from quant_pipeline.release.signoff import PRODUCTION_ALIAS, base_version, record_event

REVOKER = "quant_pipeline (re-audit)"


def previous_approved_version(store: ArtifactStore, tracker: MlflowTracker, model_name: str, but: str) -> str | None:
    """The newest other artifact of the model whose approval still stands (its registry version)."""
    for entry in reversed(decisions_of_model(store, model_name)):
        aid = entry["artifact_id"]
        if entry["event"] == "approved" and aid != but and is_approved(store, model_name, aid):
            return tracker.find_version(model_name, aid)
    return None


def revoke(
    store: ArtifactStore | Path, tracker: MlflowTracker, artifact_id: str, reason: str, dagster_run_id: str | None
) -> dict | None:
    """Revoke a standing approval of ``artifact_id`` (None: there was none to revoke)."""
    store = ArtifactStore.of(store)
    record = read_artifact_record(store, artifact_id)
    name = record.model_name
    if not is_approved(store, name, artifact_id):
        return None
    version = str(tracker.find_version(name, artifact_id))
    moved = {}
    for alias in (APPROVED_ALIAS, PRODUCTION_ALIAS):
        if str(tracker.alias_version(name, alias)) != version:
            continue
        target = previous_approved_version(store, tracker, name, artifact_id)
        if target is None and alias == PRODUCTION_ALIAS:
            target = base_version(tracker, name)
        if target is None:
            tracker.client().delete_registered_model_alias(name, alias)
        else:
            tracker.set_alias(name, alias, target)
        moved[alias] = f"v{version} -> {f'v{target}' if target else 'removed'}"
    tracker.set_version_tags(name, version, {"approval": "revoked", "revocation_reason": reason[:4000]})
    decision = Decision(
        event="revoked", artifact_id=artifact_id, registry_version=version, by=REVOKER, note=reason,
        content_hash=record.content_hash, dagster_run_id=dagster_run_id,
    )  # fmt: skip
    return record_event(store, tracker, name, {**decision.model_dump(mode="json"), "aliases_moved": moved})
