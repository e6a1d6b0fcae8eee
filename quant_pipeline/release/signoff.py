"""The sign-off workflow: approve, reject, promote, roll back — each one a trail entry and an alias move.

The organisational rule it enforces: no quantized model reaches production without a recorded,
named human sign-off on an artifact whose checks passed, and the full-precision baseline stays
one command away as the rollback target. Every decision is appended to the model's hash-chained
trail (`quant_pipeline.trail`), so an edited or removed decision is detectable; every append also
moves the trail's anchor (head hash and entry count as tags on the MLflow registered model), so a
trail cut short or swapped for a shorter valid chain is detectable too. Approve, promote and
rollback check the trail against that anchor first: a decision is never chained onto damaged history.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.records import ArtifactRecord, Decision
from quant_pipeline.core.registry_view import APPROVED_ALIAS
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.release import shared_trail
from quant_pipeline.release.evidence import (
    decisions,
    gate_failures,
    governing_policy,
    is_approved,
    judged_report,
    report_path,
    verified_bytes,
)
from quant_pipeline.release.shared_trail import TRAIL_HEAD_TAG, TRAIL_LENGTH_TAG
from quant_pipeline.release.trail import append_entry, read_verified

if TYPE_CHECKING:  # the class imports MLflow (seconds): read-only verbs run without it
    from quant_pipeline.core.registry_view import RegistryReader
    from quant_pipeline.core.tracking import MlflowTracker

PRODUCTION_ALIAS = "production"
_ANCHOR_TAGS = (TRAIL_HEAD_TAG, TRAIL_LENGTH_TAG)


class SignOffError(AuditInputError):
    """A sign-off action that the rules forbid (the message says which rule)."""


class UnknownTrailError(AuditInputError):
    """No trail file and no registered model of that name: most likely a mistyped name, not tampering."""


def trail_path(store: ArtifactStore | Path, model_name: str) -> Path:
    return ArtifactStore.of(store).trail_path(model_name)


def artifact_record(store: ArtifactStore | Path, artifact_id: str) -> ArtifactRecord:
    return read_artifact_record(ArtifactStore.of(store), artifact_id)


def record_event(store: ArtifactStore | Path, tracker: MlflowTracker, model_name: str, event: dict) -> dict:
    """Append ``event`` to the model's trail and move its anchor in MLflow to the new head.

    The anchor is checked and moved under the trail's append lock, before the line is written. An append onto a
    head that is not the anchored one is refused: re-anchoring a trail that was cut short or replaced would
    launder the damage. (A trail with no anchor yet, written before anchoring existed, is anchored as it stands.)
    If the write fails the anchor is put back; a crash between the two leaves it one entry ahead, which
    `verify_model_trail` reports, so a person looks, as with a torn line. On a tracking server every host shares
    the trail: the append catches up with the shared copy, then uploads it, under a writer lock (`shared_trail`).
    """
    _require_registered(tracker, model_name, event)
    path = trail_path(store, model_name)
    with shared_trail.writer_lock(model_name):
        shared_trail.catch_up(tracker, model_name, path)
        entry = _append_anchored(path, tracker, model_name, event)
        if tracker.is_server:
            shared_trail.push(tracker, model_name, path)
    return entry


def _append_anchored(path: Path, tracker: MlflowTracker, model_name: str, event: dict) -> dict:
    before: dict[str, str] = {}
    published: list[bool] = []

    def anchor(previous: dict | None, entry: dict) -> None:
        before.update({k: v for k, v in (tracker.model_tags(model_name) or {}).items() if k in _ANCHOR_TAGS})
        head, length = before.get(TRAIL_HEAD_TAG), before.get(TRAIL_LENGTH_TAG)
        if head is not None:
            seq = previous.get("seq") if previous else None
            at = (previous.get("hash"), str(seq + 1)) if previous and isinstance(seq, int) else (None, "0")
            if at != (head, length):
                raise SignOffError(
                    f"trail of {model_name} does not end at its MLflow anchor ({length} entries, head {head[:16]}…): "
                    f"nothing was appended; run `quant-pipeline verify-trail {model_name}`"
                )
        published.append(True)
        tracker.set_model_tags(model_name, {TRAIL_HEAD_TAG: entry["hash"], TRAIL_LENGTH_TAG: entry["seq"] + 1})

    try:
        return append_entry(path, event, before_write=anchor)
    except BaseException:
        if published:
            with contextlib.suppress(Exception):  # best effort: the original error is the one to see
                if before:
                    tracker.set_model_tags(model_name, before)
                else:
                    for tag in _ANCHOR_TAGS:
                        tracker.client().delete_registered_model_tag(model_name, tag)
        raise


def _require_registered(tracker: MlflowTracker, model_name: str, event: dict) -> None:
    """Refuse an entry naming a registry version that is not this model's version of that artifact: a trail
    entry for a version the registry does not have (an artifact's record naming another model, once) makes
    every later reader of the trail (approve, rollback, serving) act on a version that is not there."""
    version, aid = event.get("registry_version"), event.get("artifact_id")
    if version is None or not aid:
        return
    mv = tracker.model_version(model_name, aid)
    if mv is None or str(mv.version) != str(version):
        held = f"holds it as version {mv.version}" if mv is not None else "does not hold it"
        raise SignOffError(
            f"refusing to record {event.get('event')!r} of {aid} as version {version} of {model_name}: the MLflow "
            f"registry of {model_name} {held}; nothing was appended"
        )


def verify_model_trail(store: ArtifactStore | Path, tracker: RegistryReader, model_name: str) -> list[str]:
    """Everything wrong with the model's trail, checked against its MLflow anchor ([] = intact)."""
    return verified_model_trail(store, tracker, model_name)[1]


def verified_model_trail(
    store: ArtifactStore | Path, tracker: RegistryReader, model_name: str
) -> tuple[list[dict], list[str]]:
    """The model's trail entries and everything wrong with them against its MLflow anchor, from one read
    (`trail.read_verified`: act on the entries only when the problems are none).

    A name with neither a trail nor a registered model raises `UnknownTrailError`: "intact" for a
    typo would be a false assurance. A trail with no anchor is reported too: it cannot be told
    apart from one swapped wholesale (or MLflow is not the one the pipeline wrote to).
    """
    path = trail_path(store, model_name)
    tags = tracker.model_tags(model_name)
    if tags is None and not path.exists():
        raise UnknownTrailError(f"no trail for model {model_name}: check the name")
    head, length = (tags or {}).get(TRAIL_HEAD_TAG), (tags or {}).get(TRAIL_LENGTH_TAG)
    if head is None:
        if path.exists() and path.stat().st_size:
            where = "no registered model of that name" if tags is None else "the registered model has no trail_head tag"
            entries, problems = read_verified(path)
            return entries, [
                *problems,
                f"the trail is not anchored in MLflow ({where}): it was written before anchoring, or "
                "QP_MLFLOW_TRACKING_URI is not the registry the pipeline used",
            ]
        return [], []
    if not path.exists():
        return [], [
            f"the trail file is missing but MLflow anchors {length} entries (head {head[:16]}…): "
            "it was deleted or moved"
        ]
    try:
        expected_length = int(length) if length is not None else None
    except ValueError:
        entries, problems = read_verified(path, expected_head=head)
        return entries, [*problems, f"the MLflow anchor's trail_length {length!r} is not a number"]
    return read_verified(path, expected_head=head, expected_length=expected_length)


def require_intact_trail(
    store: ArtifactStore | Path, tracker: RegistryReader, model_name: str, action: str
) -> list[dict]:
    """Refuse ``action`` in one line when the model's trail does not verify against its anchor; otherwise
    the entries that verified, for ``action`` to decide on (passed on as ``trail=``, never read again)."""
    entries, problems = verified_model_trail(store, tracker, model_name)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SignOffError(
            f"cannot {action}: the audit trail of {model_name} is broken — {problems[0]}{more}; "
            f"run `quant-pipeline verify-trail {model_name}`"
        )
    return entries


GATE = "the gate"  # who records a FAIL or INCOMPLETE verdict's decision: no person is needed to refuse


def approve(
    store: ArtifactStore | Path,
    tracker: MlflowTracker,
    artifact_id: str,
    by: str,
    note: str,
    second_approver: str = "",
    override: bool = False,
    dagster_run_id: str | None = None,
) -> dict:
    """Approve an artifact: named approver + rationale, passed checks (or a policy-allowed override
    by two different people), the artifact's bytes verified at this moment, and an intact trail."""
    if not by.strip():
        raise SignOffError("approval needs a named approver (--by NAME): a machine never approves on a human's behalf")
    if not note.strip():
        raise SignOffError("approval needs a rationale (--note TEXT)")
    store = ArtifactStore.of(store)
    model_name = artifact_record(store, artifact_id).model_name
    trail = require_intact_trail(store, tracker, model_name, f"approve {artifact_id}")
    report = judged_report(store, model_name, artifact_id, trail)
    governing = (governing_policy(store, model_name, trail) or {}).get("policy_hash")
    if report.policy_hash != governing:
        raise SignOffError(
            f"artifact {artifact_id} was last judged under policy {report.policy_name} ({report.policy_hash[:12]}), "
            f"but {model_name} is governed by {str(governing)[:12]}: re-run the audit under the pinned policy"
        )
    if report.verdict == "INCOMPLETE":
        raise SignOffError(
            f"artifact {artifact_id}'s audit is INCOMPLETE ({report.reasons[0] if report.reasons else 'see report'}"
            f"{f'; +{len(report.reasons) - 1} more' if len(report.reasons) > 1 else ''}): only a PASS can be approved; "
            "measure more items (--eval-limit) or waive the slice in the policy with a reason"
        )
    failures = gate_failures(store, model_name, artifact_id, trail)
    if failures and not override:
        failing = ", ".join(f"{f['metric']}/{f['category']}" for f in failures[-1].get("failing") or []) or "checks"
        raise SignOffError(
            f"artifact {artifact_id} was rejected by the gate ({failing} under policy "
            f"{failures[-1].get('policy_name')}): a failed artifact cannot be approved later; quantize a new candidate"
        )
    if failures:
        if not report.allow_override:
            raise SignOffError(
                f"policy {report.policy_name} does not allow overrides: artifact {artifact_id} cannot be approved"
            )
        if not second_approver.strip() or second_approver.strip() == by.strip():
            raise SignOffError(
                "an override needs a second named approver, different from the first (--second-approver NAME)"
            )
    override = bool(failures) and override  # nothing to override on an artifact that never failed
    record = verified_bytes(store, tracker, artifact_id, trail)
    version = tracker.find_version(model_name, artifact_id)
    decision = Decision(
        event="approved", artifact_id=artifact_id, registry_version=version, content_hash=record.content_hash,
        by=by.strip(), second_approver=second_approver.strip() or None, override=override, note=note,
        policy_hash=report.policy_hash, report_sha256=sha256_file(report_path(store, model_name, artifact_id, trail)),
        dagster_run_id=dagster_run_id,
    )  # fmt: skip
    entry = record_event(store, tracker, model_name, decision.model_dump(mode="json"))
    label = "approved (override)" if override else "approved"
    tracker.set_version_tags(model_name, version, {
        "approval": label, "approver": by, "second_approver": second_approver, "approval_note": note,
        "approved_content_hash": record.content_hash,
    })  # fmt: skip
    tracker.set_alias(model_name, APPROVED_ALIAS, version)
    return entry


def record_pending(
    store: ArtifactStore | Path, tracker: MlflowTracker, artifact_id: str, dagster_run_id: str | None = None
) -> dict:
    record = artifact_record(store, artifact_id)
    if is_approved(store, record.model_name, artifact_id):
        # a re-run that passed again (e.g. a policy-only re-judge) leaves a standing approval standing
        return [e for e in decisions(store, record.model_name, artifact_id) if e["event"] == "approved"][-1]
    failed = gate_failures(ArtifactStore.of(store), record.model_name, artifact_id)
    if failed:  # a PASS after a FAIL (under a policy changed since) does not reopen the gate's rejection
        standing = [e for e in decisions(store, record.model_name, artifact_id) if e["event"] == "rejected"]
        if standing:
            return standing[-1]
        version = tracker.find_version(record.model_name, artifact_id)
        note = f"FAIL under policy {failed[-1].get('policy_name')} recorded at {failed[-1].get('at')}"
        decision = Decision(event="rejected", artifact_id=artifact_id, registry_version=version, by=GATE, note=note)
        tracker.set_version_tags(record.model_name, version, {"approval": "rejected", "rejected_by": GATE})
        return record_event(store, tracker, record.model_name, decision.model_dump(mode="json"))
    version = tracker.find_version(record.model_name, artifact_id)
    tracker.set_version_tags(record.model_name, version, {"approval": "pending sign-off"})
    decision = Decision(
        event="pending sign-off",
        artifact_id=artifact_id,
        registry_version=version,
        by=None,
        dagster_run_id=dagster_run_id,
    )
    return record_event(store, tracker, record.model_name, decision.model_dump(mode="json"))


def record_gate_decision(
    store: ArtifactStore | Path, tracker: MlflowTracker, artifact_id: str, dagster_run_id: str | None = None
) -> dict:
    """The decision the gate itself records when the verdict is not PASS: "rejected" for a FAIL (final:
    nothing approves the artifact later), "incomplete" for an INCOMPLETE (a fuller audit may still
    PASS). Read from the trail-verified report, not from what the caller passes along."""
    store = ArtifactStore.of(store)
    model_name = artifact_record(store, artifact_id).model_name
    report = judged_report(store, model_name, artifact_id)
    if report.verdict == "PASS":
        raise SignOffError(f"artifact {artifact_id} passed its audit: the gate has nothing to refuse")
    event = "rejected" if report.verdict == "FAIL" else "incomplete"
    why = "; ".join(report.reasons[:8]) + (f" (+{len(report.reasons) - 8} more)" if len(report.reasons) > 8 else "")
    note = f"{report.verdict} under policy {report.policy_name} ({report.policy_hash[:12]}): {why}"
    version = tracker.find_version(model_name, artifact_id)
    label = "rejected" if event == "rejected" else "incomplete (not approvable)"
    tracker.set_version_tags(
        model_name, version, {"approval": label, "rejected_by": GATE, "rejection_reason": note[:4000]}
    )
    if str(tracker.alias_version(model_name, APPROVED_ALIAS)) == str(version):
        tracker.client().delete_registered_model_alias(model_name, APPROVED_ALIAS)
    decision = Decision(
        event=event, artifact_id=artifact_id, registry_version=version, by=GATE, note=note,
        policy_hash=report.policy_hash, report_sha256=sha256_file(report_path(store, model_name, artifact_id)),
        dagster_run_id=dagster_run_id,
    )  # fmt: skip
    return record_event(store, tracker, model_name, decision.model_dump(mode="json"))


def reject(store: ArtifactStore | Path, tracker: MlflowTracker, artifact_id: str, by: str, reason: str) -> dict:
    if not by.strip() or not reason.strip():
        raise SignOffError("a rejection needs a name (--by) and a reason (--note)")
    record = artifact_record(store, artifact_id)
    version = tracker.find_version(record.model_name, artifact_id)
    tracker.set_version_tags(
        record.model_name, version, {"approval": "rejected", "rejected_by": by, "rejection_reason": reason}
    )
    if tracker.alias_version(record.model_name, APPROVED_ALIAS) == version:
        tracker.client().delete_registered_model_alias(record.model_name, APPROVED_ALIAS)
    decision = Decision(event="rejected", artifact_id=artifact_id, registry_version=version, by=by, note=reason)
    return record_event(store, tracker, record.model_name, decision.model_dump(mode="json"))


def promote(store: ArtifactStore | Path, tracker: MlflowTracker, artifact_id: str, by: str, note: str = "") -> dict:
    """Move `production` to an approved artifact (only approved ones, on an intact trail)."""
    record = artifact_record(store, artifact_id)
    model_name = record.model_name
    if not by.strip():
        raise SignOffError("promotion needs a name (--by)")
    trail = require_intact_trail(store, tracker, model_name, f"promote {artifact_id}")
    verified_bytes(ArtifactStore.of(store), tracker, artifact_id, trail)  # the bytes the registry and the trail name
    if not is_approved(store, model_name, artifact_id, trail):
        raise SignOffError(
            f"artifact {artifact_id} is not approved: only approved versions can be promoted to {PRODUCTION_ALIAS}"
        )
    version = tracker.find_version(model_name, artifact_id)
    previous = tracker.alias_version(model_name, PRODUCTION_ALIAS)
    tracker.set_alias(model_name, PRODUCTION_ALIAS, version)
    return record_event(
        store,
        tracker,
        model_name,
        {
            "event": "promoted",
            "artifact_id": artifact_id,
            "registry_version": version,
            "from_version": previous,
            "by": by,
            "note": note,
        },
    )


def rollback(
    store: ArtifactStore | Path, tracker: MlflowTracker, model_name: str, by: str, note: str, to_base: bool = False
) -> dict:
    """Move `production` back to the previous approved version, or to the kept base model.

    The target is read from the trail, so a trail that fails its anchor check is refused first."""
    if not by.strip() or not note.strip():
        raise SignOffError("a rollback needs a name (--by) and a reason (--note)")
    trail = require_intact_trail(store, tracker, model_name, f"roll back {model_name}")
    current = tracker.alias_version(model_name, PRODUCTION_ALIAS)
    target = None
    if not to_base:
        promoted = [e for e in trail if e["event"] in ("promoted", "rollback")]
        history = [e["registry_version"] for e in promoted if e.get("registry_version")]
        earlier = [v for v in reversed(history) if v != current]
        approved = (
            v for v in earlier if is_approved(store, model_name, version_artifact(tracker, model_name, v), trail)
        )
        target = next(approved, None)
    if target is None:
        target = base_version(tracker, model_name)
        if target is None:
            raise SignOffError(
                f"{model_name} has no earlier approved version and no registered base model to roll back to"
            )
    tracker.set_alias(model_name, PRODUCTION_ALIAS, target)
    return record_event(store, tracker, model_name, {
        "event": "rollback", "from_version": current, "registry_version": target,
        "artifact_id": version_artifact(tracker, model_name, target),
        "to_base": target == base_version(tracker, model_name), "by": by, "note": note,
    })  # fmt: skip


def version_artifact(tracker: MlflowTracker, model_name: str, version: str) -> str:
    return tracker.client().get_model_version(model_name, version).tags.get("artifact_id", "")


def base_version(tracker: MlflowTracker, model_name: str) -> str | None:
    mv = tracker.base_model_version(model_name)
    return mv.version if mv else None
