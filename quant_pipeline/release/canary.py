"""The `canary` alias: an approved version on a share of live traffic, and its rollback with no person asked.

Setting a canary is a person's decision and needs an approved version, exactly like a promotion: the canary
serves real users, so it may only be something that passed its audit and was signed off. Taking it off
traffic needs nobody: when live monitoring's rollback policy trips (`monitoring/rollback.py`), the alias
moves back to the version `production` serves (the approved one users already get), or is removed when
production points nowhere or at that same version. Either move is a trail entry carrying its evidence, so
the record shows who put the canary on, and which numbers took it off. Promoting a canary to production stays
`signoff.promote`, which needs the approval the canary already has and a named person.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from quant_pipeline.core.registry_view import CANARY_ALIAS
from quant_pipeline.core.store import ArtifactStore, check_name
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.monitoring.rollback import RollbackDecision
from quant_pipeline.release.evidence import verified_bytes
from quant_pipeline.release.signoff import (
    PRODUCTION_ALIAS,
    SignOffError,
    artifact_record,
    is_approved,
    record_event,
    require_intact_trail,
    version_artifact,
)

MONITOR = "quant_pipeline (live monitoring)"  # who records an automatic rollback: no person is needed to stop
CANARY_SET, CANARY_ROLLED_BACK = "canary set", "canary rolled back"


def set_canary(store: ArtifactStore | Path, tracker: MlflowTracker, artifact_id: str, by: str, note: str) -> dict:
    """Point `canary` at an approved artifact's version (a named person, an intact trail, verified bytes)."""
    check_name(artifact_id, "artifact ID")
    if not by.strip():
        raise SignOffError("setting a canary needs a name (--by): a canary serves real users")
    store = ArtifactStore.of(store)
    model_name = artifact_record(store, artifact_id).model_name
    trail = require_intact_trail(store, tracker, model_name, f"set {artifact_id} as {CANARY_ALIAS}")
    if not is_approved(store, model_name, artifact_id, trail):
        raise SignOffError(f"artifact {artifact_id} is not approved: only approved versions can be the {CANARY_ALIAS}")
    verified_bytes(store, tracker, artifact_id, trail)  # the bytes the registry and the trail name, checked now
    version = str(tracker.find_version(model_name, artifact_id))
    previous = tracker.alias_version(model_name, CANARY_ALIAS)
    tracker.set_alias(model_name, CANARY_ALIAS, version)
    tracker.set_version_tags(model_name, version, {"canary": f"set by {by.strip()}", "canary_note": note[:4000]})
    return record_event(store, tracker, model_name, {
        "event": CANARY_SET, "artifact_id": artifact_id, "registry_version": version, "from_version": previous,
        "by": by.strip(), "note": note,
    })  # fmt: skip


def roll_back_canary(
    store: ArtifactStore | Path,
    tracker: MlflowTracker,
    model_name: str,
    decision: RollbackDecision,
    run_id: str | None,
) -> dict | None:
    """Take the canary off traffic after a tripped decision: `canary` -> production's version, or removed.

    Returns the trail entry, or None when there is no canary to roll back (it was removed or never set). A
    canary moved to another version after the window was judged is refused (the evidence is not about it).
    The alias moves before the trail entry is written, as a revocation does: if the trail refuses the append
    (damaged history), the canary is already off traffic and the error says so.
    """
    if not decision.trip:
        raise SignOffError(f"the decision for {model_name} did not trip: nothing to roll back ({decision.summary})")
    current = tracker.alias_version(model_name, CANARY_ALIAS)
    if current is None:
        return None
    current = str(current)
    judged = set(decision.canary_versions) - {"?"}  # "?": lines that named no version
    if judged and current not in judged:
        raise SignOffError(
            f"{CANARY_ALIAS} of {model_name} is v{current}, but the evidence is about v{', v'.join(sorted(judged))}: "
            "it was moved since the window was judged; nothing was rolled back"
        )
    production = tracker.alias_version(model_name, PRODUCTION_ALIAS)
    target = str(production) if production is not None and str(production) != current else None
    if target is None:
        tracker.client().delete_registered_model_alias(model_name, CANARY_ALIAS)
    else:
        tracker.set_alias(model_name, CANARY_ALIAS, target)
    at = dt.datetime.now(dt.UTC).isoformat()
    tracker.set_version_tags(model_name, current, {
        "canary": "rolled back", "canary_rolled_back_at": at, "canary_rollback_reason": decision.summary[:4000],
        "canary_rollback_run": run_id or "",
    })  # fmt: skip
    return record_event(store, tracker, model_name, {
        "event": CANARY_ROLLED_BACK, "artifact_id": version_artifact(tracker, model_name, current) or None,
        "registry_version": current, "to_version": target, "alias_moved": f"v{current} -> "
        f"{f'v{target} ({PRODUCTION_ALIAS})' if target else 'removed'}", "by": MONITOR, "note": decision.summary,
        "policy": decision.policy, "window": [decision.window_start.isoformat(), decision.window_end.isoformat()],
        "evidence": [c.model_dump(mode="json") for c in decision.criteria if c.tripped], "dagster_run_id": run_id,
    })  # fmt: skip
