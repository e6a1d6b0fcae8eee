"""Stage 7 — approval: the recorded decision that lets a quantized artifact ship.

It runs only after the blocking checks on `delta_report` passed in the same run, and it re-reads
the report's verdict itself, so no path (a later run, a selection that skips the checks) can
approve a failed artifact. Without a named approver the decision is "pending sign-off": a machine
never approves on a human's behalf.
"""


import datetime as dt
import json
from pathlib import Path

import dagster as dg

from quant_pipeline.quantized_artifact import verify_artifact
from quant_pipeline.settings import AuditSettings
from quant_pipeline.storage import write_json_atomic
from quant_pipeline.tracking import APPROVED_ALIAS, MlflowTracker

APPROVED, PENDING = "approved", "pending sign-off"


class ApprovalConfig(dg.Config):
    """Set in the Dagster launchpad (or `quant-pipeline audit --approver NAME --note TEXT`)."""

    approver: str = ""
    note: str = ""


def decide(approver: str, checks_passed: bool) -> str:
    if not checks_passed:
        raise dg.Failure("delta report failed its checks: this artifact cannot be approved")
    return APPROVED if approver.strip() else PENDING


@dg.asset(group_name="audit", kinds={"mlflow"})
def approval(context: dg.AssetExecutionContext, config: ApprovalConfig, settings: AuditSettings, mlflow: MlflowTracker, quantized_artifact: dict, delta_report: dict) -> dg.MaterializeResult:
    """The sign-off decision for this artifact; an approved version gets the MLflow alias `approved`."""
    decision = decide(config.approver, delta_report["passed"])
    artifact_record = verify_artifact(Path(quantized_artifact["path"]))  # approve exactly these bytes
    model_name, version = quantized_artifact["model_name"], quantized_artifact["registry_version"]
    entry = {
        "artifact_id": quantized_artifact["artifact_id"],
        "content_hash": artifact_record["content_hash"],
        "registry_version": version,
        "decision": decision,
        "approver": config.approver.strip() or None,
        "note": config.note,
        "policy_hash": delta_report["policy_hash"],
        "dagster_run_id": context.run.run_id,
        "at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    log = settings.store / "approvals" / f"{entry['artifact_id']}.jsonl"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
    write_json_atomic(settings.store / "approvals" / f"{entry['artifact_id']}.latest.json", entry)
    with mlflow.stage_run(model_name, "approval", {"dagster_run_id": context.run.run_id, "artifact_id": entry["artifact_id"], "decision": decision}) as run:
        run.log_params({k: entry[k] for k in ("decision", "approver", "note", "content_hash")})
        run.log_json(entry, "approval.json")
    mlflow.set_version_tags(model_name, version, {"approval": decision, "approver": entry["approver"] or "", "approval_note": config.note})
    if decision == APPROVED:
        mlflow.set_alias(model_name, APPROVED_ALIAS, version)
    return dg.MaterializeResult(
        value=entry,
        metadata={
            "decision": decision,
            "approver": entry["approver"] or "(none: pending sign-off)",
            "note": config.note,
            "artifact_id": entry["artifact_id"],
            "registry": f"{model_name} v{version}" + (f" @{APPROVED_ALIAS}" if decision == APPROVED else ""),
            **run.metadata(),
        },
    )
