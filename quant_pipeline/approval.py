"""Stage 7 — approval: the recorded decision that lets a quantized artifact ship.

It runs only after the blocking checks on `delta_report` passed in the same run, and it re-reads
the report's verdict itself, so no path (a later run, a selection that skips the checks) can
approve a failed artifact. Without a named approver the decision is "pending sign-off": a machine
never approves on a human's behalf.
"""


import dagster as dg

from quant_pipeline import signoff
from quant_pipeline.settings import AuditSettings
from quant_pipeline.tracking import APPROVED_ALIAS, MlflowTracker

APPROVED, PENDING = "approved", "pending sign-off"


class ApprovalConfig(dg.Config):
    """Set in the Dagster launchpad (or `quant-pipeline audit --approver NAME --note TEXT`)."""

    approver: str = ""
    note: str = ""
    second_approver: str = ""  # only for an override of failed checks, where the policy allows one
    override: bool = False


@dg.asset(group_name="audit", kinds={"mlflow"})
def approval(context: dg.AssetExecutionContext, config: ApprovalConfig, settings: AuditSettings, mlflow: MlflowTracker, quantized_artifact: dict, delta_report: dict) -> dg.MaterializeResult:
    """The sign-off decision for this artifact; an approved version gets the MLflow alias `approved`."""
    aid = quantized_artifact["artifact_id"]
    if not delta_report["passed"] and not config.override:
        raise dg.Failure(f"delta report for {aid} failed its checks: this artifact cannot be approved")
    if config.approver.strip():
        entry = signoff.approve(settings.store, mlflow, aid, config.approver, config.note, config.second_approver, config.override, context.run.run_id)
        decision = APPROVED
    else:
        entry = signoff.record_pending(settings.store, mlflow, aid, context.run.run_id)
        decision = PENDING
    model_name, version = quantized_artifact["model_name"], quantized_artifact["registry_version"]
    entry = {**entry, "decision": decision, "approver": entry.get("by")}
    with mlflow.stage_run(model_name, "approval", {"dagster_run_id": context.run.run_id, "artifact_id": aid, "decision": decision}) as run:
        run.log_params({"decision": decision, "approver": entry["approver"], "note": config.note, "content_hash": quantized_artifact["content_hash"]})
        run.log_json(entry, "approval.json")
    return dg.MaterializeResult(
        value=entry,
        metadata={
            "decision": decision + (" (override)" if entry.get("override") else ""),
            "approver": entry["approver"] or "(none: pending sign-off)",
            "note": config.note,
            "artifact_id": aid,
            "trail_entry": entry["hash"],
            "registry": f"{model_name} v{version}" + (f" @{APPROVED_ALIAS}" if decision == APPROVED else ""),
            **run.metadata(),
        },
    )
