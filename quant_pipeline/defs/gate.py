"""The gate: per-slice deltas judged against the pinned policy, a verdict of PASS, FAIL or INCOMPLETE.

- delta_report: quantized vs base, per slice and metric, with paired intervals, judged against the
  policy pinned in the model's trail (a different policy file is refused: changing the bar is a
  named, recorded event). The report is written once per artifact x policy x evaluation and never
  rewritten; its sha256, the eval tables' and the policy's go into the trail.
- checks: no slice regressed beyond tolerance; every gated slice could show a regression; every
  metric the policy names was measured. They report, they do not block: a FAIL is the audit's
  answer, so the run goes on to record the gate's rejection (approval) and the audit report.
"""

import datetime as dt
from pathlib import Path

import dagster as dg
import pandas as pd

from quant_pipeline.core.hashing import canonical_hash, sha256_file
from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.records import DeltaReportRecord
from quant_pipeline.core.store import ArtifactStore, atomic_directory
from quant_pipeline.core.tracking import LATEST_AUDITED_ALIAS, MlflowTracker
from quant_pipeline.defs.candidates import AUDITS, stage_run
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.evaluation import delta as delta_module
from quant_pipeline.evaluation import policy as policy_module
from quant_pipeline.evaluation.delta import (
    INCOMPLETE,
    INCOMPLETE_STATUSES,
    PASS,
    REGRESSION,
    UNGATED,
    WAIVED,
    compute_deltas,
    item_table,
    verdict,
)
from quant_pipeline.evaluation.delta_html import render_html, render_markdown
from quant_pipeline.evaluation.policy import Policy, load_policy
from quant_pipeline.evaluation.report_context import ReportContext
from quant_pipeline.models.placement import described as placement_described
from quant_pipeline.models.placement import mismatch as placement_mismatch
from quant_pipeline.release.evidence import eval_table_hashes
from quant_pipeline.release.governing import require_governing
from quant_pipeline.release.revocation import revoke
from quant_pipeline.release.signoff import record_event
from quant_pipeline.release.trail import read_entries

# The code that turns eval tables into a verdict is part of the verdict's key: a gate whose rules changed
# (an upgrade) judges again, into a new report, rather than reusing one its predecessor wrote.
JUDGE_CODE = canonical_hash({m.__name__: sha256_file(Path(m.__file__)) for m in (delta_module, policy_module)})
# What the gate shows of each gated slice: the failed check's table in Dagster, the trail's `evaluated` entry (and so
# the per-model audit report, rendered from the trail). The paired item count is what "not measurable" is about.
SHOWN_COLUMNS = (
    "category", "metric", "base", "quantized", "delta", "ci_low", "ci_high", "n_items", "tolerance", "status", "reason",
)  # fmt: skip
REPORT_FILES = ("delta_report.md", "delta_report.parquet", "delta_report.json", "delta_report.html")


def _notes(deltas: pd.DataFrame, statuses: tuple[str, ...]) -> list[dict]:
    part = deltas[deltas["status"].isin(statuses)] if len(deltas) else deltas
    return [
        {"category": r.category, "metric": r.metric, "status": r.status, "reason": r.reason} for r in part.itertuples()
    ]


def _recorded(store: ArtifactStore, model_name: str, report_json: Path) -> bool:
    """Whether this exact report file is the one an `evaluated` trail entry names (then it is kept as is)."""
    if not report_json.exists():
        return False
    digest = sha256_file(report_json)
    return any(e.get("report_sha256") == digest for e in read_entries(store.trail_path(model_name)))


def judge(
    store: ArtifactStore,
    artifact: dict,
    base_eval: dict,
    quant_eval: dict,
    policy: Policy,
    policy_path: Path,
    policy_hash: str,
    tables: dict[str, str],
) -> tuple[DeltaReportRecord, pd.DataFrame, pd.DataFrame, str]:
    """Compute (or read back, if already recorded) the report of one artifact x policy x evaluation.

    ``tables`` are the sha256 of the eval tables (`eval_table_hashes`). Returns the record, the deltas,
    the per-item table and the report's folder key."""
    # same key, same inputs: the policy, the evaluation, its tables' bytes and the code that judges them
    key = f"{policy_hash[:16]}-{quant_eval['key']}-{canonical_hash({**tables, 'judge': JUDGE_CODE})[:12]}"
    out_dir = store.delta_report_dir(artifact["artifact_id"], key)
    base_items, quant_items = pd.read_parquet(base_eval["items_path"]), pd.read_parquet(quant_eval["items_path"])
    base_results, quant_results = (
        pd.read_parquet(base_eval["results_path"]),
        pd.read_parquet(quant_eval["results_path"]),
    )
    deltas = compute_deltas(base_results, quant_results, policy, base_items, quant_items)
    outcome, reasons = verdict(deltas, policy)
    executions = base_eval.get("execution") or {}, quant_eval.get("execution") or {}
    misplaced = placement_mismatch(*executions)
    if misplaced:  # the deltas measure more than the quantization: no verdict on them can stand
        outcome, reasons = INCOMPLETE, [misplaced, *reasons]
    if _recorded(store, artifact["model_name"], out_dir / "delta_report.json"):  # judged before: kept as it is
        return DeltaReportRecord.read(out_dir / "delta_report.json"), deltas, item_table(base_items, quant_items), key
    aid = artifact["artifact_id"]
    record = DeltaReportRecord.parse({
        "artifact_id": aid, "model_name": artifact["model_name"], "registry_version": artifact["registry_version"],
        "policy_path": str(policy_path.resolve()), "policy_hash": policy_hash, "policy_name": policy.name,
        "allow_override": policy.allow_override, "base_eval_key": base_eval["key"], "eval_key": quant_eval["key"],
        "verdict": outcome, "passed": outcome == PASS, "reasons": reasons,
        "failing": deltas.loc[deltas["status"] == REGRESSION, ["category", "metric"]].to_dict("records"),
        "incomplete": _notes(deltas, INCOMPLETE_STATUSES), "waived": _notes(deltas, (WAIVED,)),
        "measured_metrics": sorted(deltas["metric"].unique()) if len(deltas) else [],
        "policy_metrics": sorted(policy.tolerances),
        "categories": sorted(deltas["category"].unique()) if len(deltas) else [],
        "path": str(out_dir / "delta_report.parquet"), "markdown_path": str(out_dir / "delta_report.md"),
        "html_path": str(out_dir / "delta_report.html"),
    })  # fmt: skip
    # who and what the document is about, so the file alone names the judged bytes (no decision yet: pending)
    context = ReportContext(
        model_name=artifact["model_name"], artifact_id=aid, registry_version=artifact.get("registry_version"),
        content_hash=artifact.get("content_hash"), base_hash=artifact.get("base_hash"),
        recipe=artifact.get("recipe") or {}, calibration_hash=artifact.get("calibration_hash"),
        calibration_count=artifact.get("calibration_count"), runtime_hash=artifact.get("runtime_hash"),
        policy_name=policy.name, policy_hash=policy_hash, policy=policy, base_eval_key=base_eval["key"],
        eval_key=quant_eval["key"], placement=placement_described(*executions),
        judged_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        verdict=outcome, reasons=reasons,
    )  # fmt: skip
    markdown = render_markdown(deltas, policy, policy_hash, aid, outcome, reasons, context)
    sizes = {"base_mb": artifact.get("base_size_bytes", 0) / 2**20, "quantized_mb": artifact["size_bytes"] / 2**20}
    with atomic_directory(out_dir) as tmp:  # an unrecorded leftover (a crashed run's) is replaced whole
        deltas.to_parquet(tmp / "delta_report.parquet")
        (tmp / "delta_report.md").write_text(markdown)
        (tmp / "delta_report.html").write_text(render_html(deltas, context, base_results, quant_results, sizes))
        record.write(tmp / "delta_report.json")
    return record, deltas, item_table(base_items, quant_items), key


@dg.asset(group_name="audit", kinds={"pandas", "html"}, partitions_def=AUDITS)
def delta_report(
    context: dg.AssetExecutionContext,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    quantized_artifact: dict,
    base_eval_results: dict,
    quantized_eval_results: dict,
) -> dg.MaterializeResult:
    """Per-slice quantized-vs-base deltas with paired intervals, judged against the model's pinned policy.

    Its value carries the gated rows (base, quantized, delta, interval, tolerance, status, reason) and what was
    judged when (`judged`), so the checks below can show a reviewer the numbers, not only the slices' names."""
    store, aid, model_name = settings.store, quantized_artifact["artifact_id"], quantized_artifact["model_name"]
    with StageMeter() as meter:
        policy_path = Path(settings.policy_file)
        policy, policy_hash = load_policy(policy_path)
        require_governing(store, mlflow, model_name, policy_path, policy_hash, context.run.run_id)
        tables = eval_table_hashes(store, base_eval_results["key"], quantized_eval_results["key"])
        record, deltas, items, key = judge(
            store, quantized_artifact, base_eval_results, quantized_eval_results, policy, policy_path, policy_hash,
            tables,
        )  # fmt: skip
        report_json = Path(record.path).with_name("delta_report.json")
        gated = deltas[deltas["status"] != UNGATED]
        shown = gated[list(SHOWN_COLUMNS)]
        rows = shown.astype(object).where(shown.notna(), None).to_dict("records")  # JSON metadata: None, not NaN
        judged = {
            "report_key": key, "report_sha256": sha256_file(report_json), "dagster_run_id": context.run.run_id,
            "at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }  # fmt: skip
    record_event(store, mlflow, model_name, {
        "event": "evaluated", "artifact_id": aid, "registry_version": record.registry_version,
        "verdict": record.verdict, "passed": record.passed, "reasons": record.reasons,
        "report_key": key, "report_sha256": judged["report_sha256"],  # what approve trusts, not the file itself
        # and each of the report's files: what a host rebuilding its store from the server takes (release.rebuild)
        "report_files": {name: sha256_file(report_json.with_name(name)) for name in REPORT_FILES},
        "eval_tables": tables,
        "failing": [f.model_dump() for f in record.failing], "waived": [w.model_dump() for w in record.waived],
        "policy_name": policy.name, "policy_hash": policy_hash, "dagster_run_id": context.run.run_id,
        "deltas": shown.to_dict("records"),
    })  # fmt: skip
    with stage_run(context, mlflow, meter, model_name, "delta_report", artifact_id=aid, policy_hash=policy_hash) as run:
        run.log_params({"policy_name": policy.name, "policy_hash": policy_hash, "verdict": record.verdict})
        # shown rounded (-0.08, not -0.07999999999999996); the gate judged the exact values in the report
        run.log_metrics({f"delta/{r.metric}/{r.category}": r.delta for r in deltas.itertuples()}, digits=6)
        run.log_metrics(
            {"slices_failed": len(record.failing), "slices_incomplete": len(record.incomplete), **meter.metadata()}
        )
        for name in REPORT_FILES:
            run.log_file(report_json.with_name(name))
        run.log_file(policy_path, "policy")
        run.client.log_table(run.run_id, data=items, artifact_file="eval_items.json")
    mlflow.set_version_tags(
        model_name,
        record.registry_version,
        {"verdict": record.verdict, "delta_passed": record.passed, "policy_hash": policy_hash},
    )
    mlflow.set_alias(model_name, LATEST_AUDITED_ALIAS, record.registry_version)
    html_url = Path(record.html_path).resolve().as_uri()
    mlflow.describe_judgement(
        model_name,
        record.registry_version,
        f"Judged {judged['at']}: {record.verdict} under policy {policy.name} ({policy_hash[:12]}); "
        f"{len(record.failing)} of {len(gated)} gated slices regressed beyond tolerance, {len(record.incomplete)} "
        f"could not show a regression, {len(record.waived)} waived. Report: {html_url} (report key {key}, sha256 "
        f"{judged['report_sha256'][:16]}). MLflow run: {run.url}",
    )
    revoked = None
    if not record.passed:  # an approval stands only while the artifact keeps passing its audits
        why = "; ".join(record.reasons[:5]) + (f" (+{len(record.reasons) - 5} more)" if len(record.reasons) > 5 else "")
        reason = f"re-audit verdict {record.verdict} under policy {policy.name} ({policy_hash[:12]}): {why}"
        revoked = revoke(store, mlflow, aid, reason, context.run.run_id)
    revocation = f"{revoked['note']}; aliases {revoked['aliases_moved'] or 'unchanged'}" if revoked else ""
    return dg.MaterializeResult(
        value={
            **record.dump(),
            "report_sha256": judged["report_sha256"],
            "approval_revoked": revocation,
            "gated_slices": rows,
            "judged": judged,
        },
        metadata={
            "verdict": record.verdict,
            "report": dg.MetadataValue.md(report_json.with_name("delta_report.md").read_text()),
            "html_report": dg.MetadataValue.path(record.html_path),  # the CLI prints it
            "html_report_url": dg.MetadataValue.url(html_url),  # clickable in the UI
            "report_key": key,
            "report_sha256": judged["report_sha256"],
            "passed": record.passed,
            "slices": len(gated),
            "slices_failed": len(record.failing),
            "slices_incomplete": len(record.incomplete),
            "slices_waived": len(record.waived),
            "reasons": dg.MetadataValue.md("\n".join(f"- {r}" for r in record.reasons) or "none"),
            "policy_hash": policy_hash,
            "approval_revoked": revocation or "no",
            **meter.metadata(),
            **run.metadata(),
        },
    )


@dg.asset_check(
    asset=delta_report,
    partitions_def=AUDITS,
    description="No slice regressed beyond the policy's tolerance (FAIL otherwise).",
)
def slices_within_tolerance(delta_report: dict) -> dg.AssetCheckResult:
    """Each failing slice with its numbers (base, quantized, delta, interval, tolerance), as a table to read and
    a JSON list to copy, and which report (key, sha256, run, time) was judged: a check's own timestamp is the
    run's start, not the judgement's."""
    failing = delta_report["failing"]
    names = {(f["metric"], f["category"]) for f in failing}
    rows = [r for r in delta_report.get("gated_slices", []) if (r["metric"], r["category"]) in names]
    table = pd.DataFrame(
        {
            "slice": [f"{r['metric']}/{r['category']}" for r in rows],
            **{c: [r[c] for r in rows] for c in ("base", "quantized", "delta")},
            "interval": [
                f"[{r['ci_low']:.4g}, {r['ci_high']:.4g}]" if None not in (r["ci_low"], r["ci_high"]) else "-"
                for r in rows
            ],
            "tolerance": [r["tolerance"] for r in rows],
        }
    )
    return dg.AssetCheckResult(
        passed=not failing,
        metadata={
            "failing_slices": ", ".join(f"{f['metric']}/{f['category']}" for f in failing) or "none",
            "failing": dg.MetadataValue.md(table.to_markdown(index=False, floatfmt=".6g") if rows else "none"),
            "failing_rows": dg.MetadataValue.json(rows),
            "approval_revoked": delta_report.get("approval_revoked") or "no",
            **{f"judged_{k}": v for k, v in delta_report.get("judged", {}).items()},
        },
    )


@dg.asset_check(
    asset=delta_report,
    partitions_def=AUDITS,
    description="Every gated slice could show a regression: enough items, a value, a base above floor and chance "
    "(INCOMPLETE otherwise; waived slices are listed, not counted).",
)
def every_gated_slice_informative(delta_report: dict) -> dg.AssetCheckResult:
    """Names each slice that could not show a regression, with its status and reason (and the values it had)."""
    notes = delta_report["incomplete"]
    values = {(r["metric"], r["category"]): r for r in delta_report.get("gated_slices", [])}
    rows = [
        {
            "slice": f"{n['metric']}/{n['category']}", "status": n["status"], "reason": n["reason"],
            **{c: values.get((n["metric"], n["category"]), {}).get(c) for c in ("base", "quantized", "delta")},
        }
        for n in notes
    ]  # fmt: skip
    return dg.AssetCheckResult(
        passed=not notes and delta_report["verdict"] != "INCOMPLETE",
        metadata={
            "not_measurable": ", ".join(r["slice"] for r in rows) or "none",
            "incomplete": dg.MetadataValue.md(
                pd.DataFrame(rows).to_markdown(index=False, floatfmt=".6g") if rows else "none"
            ),
            "incomplete_rows": dg.MetadataValue.json(rows),
            "waived": ", ".join(f"{w['metric']}/{w['category']}" for w in delta_report["waived"]) or "none",
            **{f"judged_{k}": v for k, v in delta_report.get("judged", {}).items()},
        },
    )


@dg.asset_check(
    asset=delta_report,
    partitions_def=AUDITS,
    description="Every metric the policy names was measured on both models.",
)
def policy_metrics_measured(delta_report: dict) -> dg.AssetCheckResult:
    missing = sorted(set(delta_report["policy_metrics"]) - set(delta_report["measured_metrics"]))
    return dg.AssetCheckResult(
        passed=not missing,
        metadata={
            "missing_metrics": ", ".join(missing) or "none",
            **{f"judged_{k}": v for k, v in delta_report.get("judged", {}).items()},
        },
    )
