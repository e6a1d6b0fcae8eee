"""The sign-off decision on the audited artifact, recorded whatever the verdict.

- PASS: a named approver approves (the MLflow alias `approved` moves); without one the decision is
  "pending sign-off": a machine never approves on a human's behalf.
- FAIL: the gate records "rejected by the gate" with the failing slices; nothing approves the
  artifact later (only a two-person override, where the policy allows one).
- INCOMPLETE: the gate records "incomplete": not approvable until a fuller audit passes.

The verdict is re-read from the report whose hash the trail holds, never from the upstream value,
so no path (a later run, a selection that skips the checks, an edited report) approves a failure.
"""

import dagster as dg

from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.tracking import APPROVED_ALIAS, MlflowTracker
from quant_pipeline.defs.candidates import AUDITS, stage_run
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.release import signoff
from quant_pipeline.release.carry import carry_approval
from quant_pipeline.release.evidence import judged_report

APPROVED, PENDING, REJECTED, INCOMPLETE = (
    "approved",
    "pending sign-off",
    "rejected by the gate",
    "incomplete: not approvable",
)


class ApprovalConfig(dg.Config):
    """Set in the Dagster launchpad (or `quant-pipeline audit --approver NAME --note TEXT`)."""

    approver: str = ""
    note: str = ""
    second_approver: str = ""  # only for an override of failed checks, where the policy allows one
    override: bool = False


@dg.asset(group_name="audit", kinds={"mlflow"}, deps=["delta_report"], partitions_def=AUDITS)
def approval(
    context: dg.AssetExecutionContext,
    config: ApprovalConfig,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    quantized_artifact: dict,
) -> dg.MaterializeResult:
    """The sign-off decision for this artifact: approved, pending sign-off, or refused by the gate."""
    aid, store = quantized_artifact["artifact_id"], settings.store
    run_id = context.run.run_id
    with StageMeter() as meter:
        model_name = read_artifact_record(store, aid).model_name
        report = judged_report(store, model_name, aid)
        if report.verdict != "PASS" and not (config.override and report.verdict == "FAIL"):
            entry = signoff.record_gate_decision(store, mlflow, aid, run_id)
            decision = REJECTED if entry["event"] == "rejected" else INCOMPLETE
        elif config.approver.strip():
            entry = signoff.approve(
                store, mlflow, aid, config.approver, config.note, config.second_approver, config.override, run_id
            )
            decision = APPROVED
        else:  # the same approved weights under a new ID need no second sign-off (release/carry.py)
            entry = carry_approval(store, mlflow, aid, run_id) or signoff.record_pending(store, mlflow, aid, run_id)
            decision = {"approved": APPROVED, "rejected": REJECTED}.get(entry["event"], PENDING)  # one that stands
    version = quantized_artifact["registry_version"]
    entry = {**entry, "decision": decision, "approver": entry.get("by"), "verdict": report.verdict}
    with stage_run(context, mlflow, meter, model_name, "approval", artifact_id=aid, decision=decision) as run:
        run.log_params(
            {
                "decision": decision,
                "verdict": report.verdict,
                "approver": entry["approver"],
                "note": config.note,
                "content_hash": quantized_artifact["content_hash"],
            }
        )
        run.log_metrics(meter.metadata())
        run.log_json(entry, "approval.json")
    return dg.MaterializeResult(
        value=entry,
        metadata={
            "decision": decision + (" (override)" if entry.get("override") else ""),
            "verdict": report.verdict,
            "approver": entry["approver"] or "(none: pending sign-off)",
            "note": entry.get("note") or config.note,
            "artifact_id": aid,
            "trail_entry": entry["hash"],
            "registry": f"{model_name} v{version}" + (f" @{APPROVED_ALIAS}" if decision == APPROVED else ""),
            **meter.metadata(),
            **run.metadata(),
        },
    )
