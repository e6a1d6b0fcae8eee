"""The gate: per-slice deltas against the policy, two blocking checks, and the recorded sign-off decision.

- delta_report: quantized vs base, per slice and metric, with paired intervals, judged against the
  pre-committed policy (its hash is in the report).
- checks: no slice regressed beyond tolerance; every metric the policy names was measured.
- approval: runs only after the blocking checks passed in the same run, and re-reads the report's
  verdict itself, so no path (a later run, a selection that skips the checks) can approve a failed
  artifact. Without a named approver the decision is "pending sign-off": a machine never approves
  on a human's behalf.
"""

from pathlib import Path

import dagster as dg
import pandas as pd

from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.records import DeltaReportRecord
from quant_pipeline.core.store import atomic_file, write_json_atomic, write_text_atomic
from quant_pipeline.core.tracking import APPROVED_ALIAS, MlflowTracker
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.evaluation.delta import NOT_MEASURABLE, REGRESSION, UNGATED, compute_deltas, item_table
from quant_pipeline.evaluation.delta_html import render_html, render_markdown
from quant_pipeline.evaluation.policy import load_policy
from quant_pipeline.release import signoff
from quant_pipeline.release.revocation import revoke
from quant_pipeline.release.signoff import record_event


@dg.asset(group_name="audit", kinds={"pandas", "html"})
def delta_report(
    context: dg.AssetExecutionContext,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    quantized_artifact: dict,
    base_eval_results: dict,
    quantized_eval_results: dict,
) -> dg.MaterializeResult:
    """Per-slice quantized-vs-base deltas with paired intervals, judged against the pre-committed policy."""
    policy_path = Path(settings.policy_file)
    policy, policy_hash = load_policy(policy_path)
    base_results, quant_results = (
        pd.read_parquet(base_eval_results["results_path"]),
        pd.read_parquet(quantized_eval_results["results_path"]),
    )
    base_items, quant_items = (
        pd.read_parquet(base_eval_results["items_path"]),
        pd.read_parquet(quantized_eval_results["items_path"]),
    )
    deltas = compute_deltas(base_results, quant_results, policy, base_items, quant_items)
    aid = quantized_artifact["artifact_id"]
    markdown = render_markdown(deltas, policy, policy_hash, aid)
    out_dir = settings.store.report_dir(aid)
    with atomic_file(out_dir / "delta_report.parquet") as tmp:
        deltas.to_parquet(tmp)
    write_text_atomic(out_dir / "delta_report.md", markdown)
    sizes = {
        "base_mb": quantized_artifact.get("base_size_bytes", 0) / 2**20,
        "quantized_mb": quantized_artifact["size_bytes"] / 2**20,
    }
    write_text_atomic(out_dir / "delta_report.html", render_html(deltas, markdown, base_results, quant_results, sizes))
    gated = deltas[deltas["status"] != UNGATED]
    passed = bool(len(gated) and gated["passed"].all())
    record = DeltaReportRecord.parse({
        "artifact_id": aid, "model_name": quantized_artifact["model_name"],
        "registry_version": quantized_artifact["registry_version"],
        "policy_path": str(policy_path.resolve()), "policy_hash": policy_hash, "policy_name": policy.name,
        "allow_override": policy.allow_override,
        "passed": passed,
        "failing": deltas.loc[deltas["status"] == REGRESSION, ["category", "metric"]].to_dict("records"),
        "not_measurable": deltas.loc[deltas["status"] == NOT_MEASURABLE, ["category", "metric"]].to_dict("records"),
        "measured_metrics": sorted(deltas["metric"].unique()) if len(deltas) else [],
        "policy_metrics": sorted(policy.tolerances),
        "categories": sorted(deltas["category"].unique()) if len(deltas) else [],
        "path": str(out_dir / "delta_report.parquet"), "markdown_path": str(out_dir / "delta_report.md"),
        "html_path": str(out_dir / "delta_report.html"),
    }).dump()  # fmt: skip
    write_json_atomic(out_dir / "delta_report.json", record)
    record_event(settings.store, mlflow, record["model_name"], {
        "event": "evaluated", "artifact_id": aid, "registry_version": record["registry_version"], "passed": passed,
        "report_sha256": sha256_file(out_dir / "delta_report.json"),  # what approve trusts, not the file itself
        "failing": record["failing"], "policy_name": policy.name, "policy_hash": policy_hash,
        "dagster_run_id": context.run.run_id,
        "deltas": deltas[deltas["status"] != UNGATED][
            ["category", "metric", "base", "quantized", "delta", "ci_low", "ci_high", "tolerance", "status"]
        ].to_dict("records"),
    })  # fmt: skip
    with mlflow.stage_run(
        record["model_name"],
        "delta_report",
        {"dagster_run_id": context.run.run_id, "artifact_id": aid, "policy_hash": policy_hash},
    ) as run:
        run.log_params({"policy_name": policy.name, "policy_hash": policy_hash, "passed": passed})
        run.log_metrics(
            {f"delta/{r.metric}/{r.category}": r.delta for r in deltas.itertuples()}
            | {"slices_failed": len(record["failing"]), "slices_not_measurable": len(record["not_measurable"])}
        )
        for name in ("delta_report.md", "delta_report.parquet", "delta_report.json", "delta_report.html"):
            run.log_file(out_dir / name)
        run.log_file(policy_path, "policy")
        run.client.log_table(run.run_id, data=item_table(base_items, quant_items), artifact_file="eval_items.json")
    mlflow.set_version_tags(
        record["model_name"],
        quantized_artifact["registry_version"],
        {"delta_passed": passed, "policy_hash": policy_hash},
    )
    revoked = None
    if not passed:  # an approval stands only while the artifact keeps passing its audits
        failing = ", ".join(f"{f['metric']}/{f['category']}" for f in record["failing"]) or "a gated metric"
        reason = f"re-audit did not pass under policy {policy.name} ({policy_hash[:12]}): {failing}"
        revoked = revoke(settings.store, mlflow, aid, reason, context.run.run_id)
    revocation = f"{revoked['note']}; aliases {revoked['aliases_moved'] or 'unchanged'}" if revoked else ""
    return dg.MaterializeResult(
        value={**record, "approval_revoked": revocation},
        metadata={
            "report": dg.MetadataValue.md(markdown),
            "html_report": dg.MetadataValue.path(record["html_path"]),
            "passed": passed,
            "slices": len(gated),
            "slices_failed": len(record["failing"]),
            "slices_not_measurable": len(record["not_measurable"]),
            "policy_hash": policy_hash,
            "approval_revoked": revocation or "no",
            **run.metadata(),
        },
    )


@dg.asset_check(
    asset=delta_report,
    blocking=True,
    description="No slice regressed beyond the policy's tolerance (one bad slice fails the gate).",
)
def slices_within_tolerance(delta_report: dict) -> dg.AssetCheckResult:
    failing = delta_report["failing"]
    return dg.AssetCheckResult(
        passed=delta_report["passed"],
        metadata={
            "failing_slices": ", ".join(f"{f['metric']}/{f['category']}" for f in failing) or "none",
            "not_measurable": len(delta_report.get("not_measurable", [])),
            "approval_revoked": delta_report.get("approval_revoked") or "no",
        },
    )


@dg.asset_check(
    asset=delta_report,
    blocking=True,
    description="Every metric the policy names was measured on both models (no silent gaps).",
)
def policy_metrics_measured(delta_report: dict) -> dg.AssetCheckResult:
    missing = sorted(set(delta_report["policy_metrics"]) - set(delta_report["measured_metrics"]))
    return dg.AssetCheckResult(passed=not missing, metadata={"missing_metrics": ", ".join(missing) or "none"})


APPROVED, PENDING = "approved", "pending sign-off"


class ApprovalConfig(dg.Config):
    """Set in the Dagster launchpad (or `quant-pipeline audit --approver NAME --note TEXT`)."""

    approver: str = ""
    note: str = ""
    second_approver: str = ""  # only for an override of failed checks, where the policy allows one
    override: bool = False


@dg.asset(group_name="audit", kinds={"mlflow"})
def approval(
    context: dg.AssetExecutionContext,
    config: ApprovalConfig,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    quantized_artifact: dict,
    delta_report: dict,
) -> dg.MaterializeResult:
    """The sign-off decision for this artifact; an approved version gets the MLflow alias `approved`."""
    aid = quantized_artifact["artifact_id"]
    if not delta_report["passed"] and not config.override:
        raise dg.Failure(f"delta report for {aid} failed its checks: this artifact cannot be approved")
    if config.approver.strip():
        entry = signoff.approve(
            settings.store,
            mlflow,
            aid,
            config.approver,
            config.note,
            config.second_approver,
            config.override,
            context.run.run_id,
        )
        decision = APPROVED
    else:
        entry = signoff.record_pending(settings.store, mlflow, aid, context.run.run_id)
        decision = APPROVED if entry["event"] == "approved" else PENDING  # an approval that stands
    model_name, version = quantized_artifact["model_name"], quantized_artifact["registry_version"]
    entry = {**entry, "decision": decision, "approver": entry.get("by")}
    with mlflow.stage_run(
        model_name, "approval", {"dagster_run_id": context.run.run_id, "artifact_id": aid, "decision": decision}
    ) as run:
        run.log_params(
            {
                "decision": decision,
                "approver": entry["approver"],
                "note": config.note,
                "content_hash": quantized_artifact["content_hash"],
            }
        )
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
