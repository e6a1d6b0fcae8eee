"""The policy that governs a model: pinned in its trail, changed only by a named person with a reason.

A tolerance policy is only a commitment if it cannot be swapped after the results are in. So the
first audit of a model pins the policy it ran under as a trail entry (hash-chained and anchored in
MLflow like every decision); every later audit must run under the pinned policy, and pointing
`QP_POLICY_FILE` at a laxer file is refused, not silently judged. Changing the policy is itself a
release event (`quant-pipeline pin-policy`), with a name and a reason, that a reviewer sees in the
trail and the audit report. A copy of each pinned policy is kept in the store under its sha256, so
the exact bar a verdict was judged against can be read back and checked years later.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import file_matches
from quant_pipeline.core.records import Architecture
from quant_pipeline.core.store import ArtifactStore, write_bytes_atomic
from quant_pipeline.evaluation.policy import load_policy
from quant_pipeline.release import shared_trail
from quant_pipeline.release.evidence import PINNED, governing_policy
from quant_pipeline.release.signoff import SignOffError, record_event, require_intact_trail
from quant_pipeline.release.trail import read_entries

if TYPE_CHECKING:  # the class imports MLflow (seconds): read-only verbs run without it
    from quant_pipeline.core.tracking import MlflowTracker

FIRST_AUDIT = "first audit"


class PolicyNotPinnedError(AuditInputError):
    """An audit under a policy other than the one pinned for the model."""


def _keep_copy(store: ArtifactStore, policy_file: Path, policy_hash: str) -> Path:
    copy = store.policy_path(policy_hash)
    if not file_matches(copy, policy_hash):
        write_bytes_atomic(copy, policy_file.read_bytes())
    return copy


def pinned_policy_file(store: ArtifactStore | Path, policy_hash: str) -> Path:
    """The store's copy of a pinned policy, re-hashed: a copy edited in place is refused."""
    copy = ArtifactStore.of(store).policy_path(policy_hash)
    if not file_matches(copy, policy_hash):
        raise AuditInputError(f"{copy}: missing or does not hash to {policy_hash[:12]}: the store's copy was altered")
    return copy


def pin_policy(
    store: ArtifactStore | Path,
    tracker: MlflowTracker,
    model_name: str,
    policy_file: Path,
    by: str,
    reason: str,
    dagster_run_id: str | None = None,
) -> dict:
    """Make ``policy_file`` the policy that governs ``model_name`` from now on (a trail entry).

    The file is validated first, the trail must verify against its anchor, and the change needs a
    named person and a reason; re-pinning the policy already in force is refused as a no-op."""
    store = ArtifactStore.of(store)
    if not by.strip() or not reason.strip():
        raise SignOffError("pinning a policy needs a name (--by NAME) and a reason (--reason TEXT)")
    policy, policy_hash = load_policy(Path(policy_file))
    trail = require_intact_trail(store, tracker, model_name, f"pin a policy for {model_name}")
    current = governing_policy(store, model_name, trail)
    if current is not None and current.get("policy_hash") == policy_hash:
        raise SignOffError(f"policy {policy.name} ({policy_hash[:12]}) already governs {model_name}: nothing to change")
    shared_trail.share_policy(tracker, model_name, _keep_copy(store, Path(policy_file), policy_hash))
    return record_event(store, tracker, model_name, {
        "event": PINNED, "policy_hash": policy_hash, "policy_name": policy.name,
        "policy_path": str(Path(policy_file).resolve()), "by": by.strip(), "reason": reason.strip(),
        "previous_policy_hash": current.get("policy_hash") if current else None,
        "waivers": [w.model_dump() for w in policy.waivers], "dagster_run_id": dagster_run_id,
    })  # fmt: skip


def require_governing(
    store: ArtifactStore | Path,
    tracker: MlflowTracker,
    model_name: str,
    policy_file: Path,
    policy_hash: str,
    dagster_run_id: str | None = None,
) -> dict:
    """The pinned policy entry, which must be ``policy_file``'s; the first judged audit pins it."""
    current = check_governing(store, model_name, policy_file, policy_hash)
    if current is None:
        return pin_policy(
            store, tracker, model_name, policy_file, FIRST_AUDIT,
            f"the policy the first judged audit of {model_name} ran under", dagster_run_id,
        )  # fmt: skip
    return current


def check_governing(store: ArtifactStore | Path, model_name: str, policy_file: Path, policy_hash: str) -> dict | None:
    """The pinned policy entry (None: nothing pinned yet), refusing a ``policy_file`` that is not it. Called by the
    pre-run check too, so a policy the gate would refuse stops the audit before any model work, not after it."""
    current = governing_policy(store, model_name)
    if current is not None and current.get("policy_hash") != policy_hash:
        raise PolicyNotPinnedError(
            f"policy file {policy_file} (sha256 {policy_hash[:12]}) is not the policy governing {model_name} "
            f"({current.get('policy_name')}, sha256 {str(current.get('policy_hash'))[:12]}, pinned by "
            f"{current.get('by')}): point QP_POLICY_FILE at that policy, or change it on the record with "
            f"`quant-pipeline pin-policy {model_name} --file {policy_file} --by NAME --reason TEXT`"
        )
    return current


def base_architecture(store: ArtifactStore, model_name: str) -> Architecture | None:
    """The base architecture the model's trail last recorded (its latest `audit` entry naming one): with the
    pinned policy, what a model's name commits it to (`models.identity.check_same_architecture`)."""
    path = store.trail_path(model_name)
    held = [e["base_architecture"] for e in read_entries(path) if e.get("base_architecture")] if path.exists() else []
    return Architecture.model_validate(held[-1]) if held else None
