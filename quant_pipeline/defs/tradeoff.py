"""The tradeoff across a model's candidates: the table, the Pareto frontiers and the recommended candidate.

Partitioned by model, downstream of every candidate's verdict and decision. Which artifact is a candidate's
current one comes from Dagster (its model x candidate partition's latest quantized_artifact); everything else is
read back from the store and re-verified against the trail the gate wrote (`release.evidence.judged_report`) and the
artifact's own hashes, so a report or table edited after the gate judged it turns the candidate UNVERIFIED.
"""

import json

import dagster as dg
import pandas as pd

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.records import EvalRecord
from quant_pipeline.core.store import atomic_directory
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import MODELS, audited, context_model, stage_run
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.evaluation.delta import compute_deltas
from quant_pipeline.evaluation.policy import load_policy
from quant_pipeline.release.evidence import EVAL_TABLES, judged_report
from quant_pipeline.release.governing import pinned_policy_file
from quant_pipeline.release.signoff import governing_policy
from quant_pipeline.release.tradeoff import (
    TradeoffRow,
    markdown_table,
    pareto_front,
    plot_fronts,
    recommend,
    why_kept,
    worst_regression,
)

QUALITY = "category != 'cost'"  # identity's check: every delta but measured time and memory


def current_artifact(instance: dg.DagsterInstance, model: str, candidate: str) -> str | None:
    """The artifact ID the model's candidate's latest quantized_artifact materialization produced."""
    key = str(dg.MultiPartitionKey({"model": model, "candidate": candidate}))
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("quantized_artifact"), asset_partitions=[key]), limit=1
    ).records
    if not records:
        return None
    value = records[0].asset_materialization.metadata.get("artifact_id")
    return getattr(value, "value", value)


def candidate_row(
    settings: AuditSettings, base: dict, key: str, aid: str, current: tuple[str | None, str | None] = (None, None)
) -> tuple[TradeoffRow, dict]:
    """One candidate's row (UNVERIFIED, with the reason, when its evidence does not read back; STALE when it was
    judged under another policy or base evaluation than `current`, the model's governing policy hash and current
    base evaluation key) and its deltas."""
    store = settings.store
    record = verify_artifact(store, aid)
    if record.base_hash != base["hash"]:
        raise AuditInputError(f"{aid} was made from another base ({record.base_hash[:12]}): re-audit {key}")
    cost = {"size_bytes": record.size_bytes, "size_vs_base": round(record.size_bytes / base["size_bytes"], 4)}
    keep = record.recipe.get("keep") or ""
    facts = {"candidate": key, "artifact_id": aid, "method": record.recipe.get("method", "gptq"),
             "precision": record.precision, "kept": keep,
             "why_kept": why_kept(keep, record.layer_sensitivity) if keep else "", **cost}  # fmt: skip
    try:
        report = judged_report(store, record.model_name, aid)  # also re-hashes the four eval tables
        evaluation = EvalRecord.read(store.eval_dir(report.eval_key) / "record.json")
        policy, _ = load_policy(pinned_policy_file(store, report.policy_hash))  # the policy it was judged under
        # recomputed from the verified tables, not read from the report's parquet (which no hash covers)
        base_results, quant_results, base_items, quant_items = (
            pd.read_parquet(store.eval_dir(k) / n) for n in EVAL_TABLES for k in (report.base_eval_key, report.eval_key)
        )
        deltas = compute_deltas(base_results, quant_results, policy, base_items, quant_items)
    except AuditInputError as e:
        empty = {"peak_rss_mb": 0.0, "latency_p50_s": float("nan"), "latency_p95_s": float("nan")}
        return TradeoffRow(**facts, **empty, tokens_per_second=0.0, verdict="UNVERIFIED", reason=str(e)), {}
    policy_now, base_eval_now = current
    stale = [
        what
        for what, was, now in (
            (f"judged under policy {report.policy_hash[:12]}, not the governing {(policy_now or '')[:12]}",
             report.policy_hash, policy_now),
            (f"judged against base evaluation {report.base_eval_key}, not the current {base_eval_now}",
             report.base_eval_key, base_eval_now),
        )
        if now is not None and was != now
    ]  # fmt: skip
    verdict, reason = (
        ("STALE", "; ".join(stale) + f" (it was {report.verdict}): re-audit {key}")
        if stale
        else (report.verdict, "; ".join(report.reasons[:2]))
    )
    row = TradeoffRow(
        **facts, verdict=verdict, reason=reason,
        peak_rss_mb=evaluation.generation_peak_rss_mb, latency_p50_s=evaluation.latency_p50_s,
        latency_p95_s=evaluation.latency_p95_s, tokens_per_second=evaluation.tokens_per_second,
        **worst_regression(deltas, {m for m, t in policy.tolerances.items() if t.direction == "higher_is_better"}),
    )  # fmt: skip
    return row, {"deltas": deltas}


@dg.asset(group_name="audit", kinds={"pandas", "html"}, deps=["approval"], partitions_def=MODELS)
def candidate_tradeoff(
    context: dg.AssetExecutionContext,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    base_checkpoint: dict,
    base_eval_results: dict,
) -> dg.MaterializeResult:
    """Every candidate of the model side by side (size, peak memory, latency, worst per-slice regression
    with its interval, verdict), the Pareto frontiers, and the candidate recommended for sign-off."""
    rows, identity_moved, skipped = [], None, []
    with StageMeter() as meter:
        model = context_model(context)
        pinned = governing_policy(settings.store, base_checkpoint["model_name"])
        current = (pinned["policy_hash"] if pinned else None, base_eval_results["key"])
        for key in audited(context.instance).get(model, []):
            aid = current_artifact(context.instance, model, key)
            if aid is None:
                skipped.append(f"{key}: not audited yet")
                continue
            try:
                row, extra = candidate_row(settings, base_checkpoint, key, aid, current)
            except AuditInputError as e:  # bytes that do not match their record, or another base's artifact
                skipped.append(f"{key}: {e}")
                continue
            rows.append(row)
            if row.method == "identity" and not extra:  # unverified evidence is not a clean identity
                identity_moved = [f"evidence unverified: {row.reason}"]
            elif row.method == "identity":
                moved = extra["deltas"].query(QUALITY).dropna(subset=["delta"])
                identity_moved = [f"{r.metric}/{r.category}: {r.delta:+.3g}" for r in moved.itertuples() if r.delta]
        # the base evaluation's record (this asset's input) holds the latency the same probe measured for it
        best, why = recommend(rows, settings.objective, base_eval_results.get("latency_p50_s"))
        table = markdown_table(rows, best.candidate if best else None)
        out = settings.store.report_dir(base_checkpoint["model_name"]) / "tradeoff"
        with atomic_directory(out) as tmp:
            (tmp / "tradeoff.md").write_text(f"# Candidates of {base_checkpoint['model_name']}\n\n{table}\n{why}\n")
            (tmp / "tradeoff.json").write_text(json.dumps({
                "rows": [r.model_dump() for r in rows], "recommended": best.candidate if best else None,
                "recommended_artifact": best.artifact_id if best else None, "objective": settings.objective,
                "why": why, "skipped": skipped, "identity_moved": identity_moved,
                "pareto": {c: pareto_front(rows, c) for c in ("size_bytes", "latency_p50_s")},
            }, indent=2, default=str))  # fmt: skip
            plot_fronts(rows, tmp / "tradeoff.svg")
    with stage_run(context, mlflow, meter, base_checkpoint["model_name"], "candidate_tradeoff") as run:
        for name in ("tradeoff.md", "tradeoff.json", "tradeoff.svg"):
            run.log_file(out / name)
        run.log_metrics({f"{r.candidate}.worst_share": r.worst_share for r in rows})
        run.set_tags({"recommended": best.candidate if best else "none", "objective": settings.objective})
    return dg.MaterializeResult(
        value={
            "path": str(out),
            "model_name": base_checkpoint["model_name"],
            "artifacts": [r.artifact_id for r in rows],
            "verdicts": {r.candidate: r.verdict for r in rows},
            "recommended": best.artifact_id if best else None,
            "identity_moved": identity_moved,
        },  # fmt: skip
        metadata={
            "tradeoff": dg.MetadataValue.md(table),
            "recommendation": why,
            "recommended_artifact": best.artifact_id if best else "none",
            "candidates": len(rows),
            "skipped": dg.MetadataValue.json(skipped),
            "plot": dg.MetadataValue.path(str(out / "tradeoff.svg")),
            **meter.metadata(),
            **run.metadata(),
        },
    )


# Partitioned like its asset: an unpartitioned check would load every model's tradeoff at once (a dict by model).
@dg.asset_check(
    asset=candidate_tradeoff, partitions_def=MODELS,
    description="The identity candidate (the base, copied) moved no metric.",
)  # fmt: skip
def identity_moves_nothing(candidate_tradeoff: dict) -> dg.AssetCheckResult:
    moved = candidate_tradeoff["identity_moved"]
    if moved is None:
        return dg.AssetCheckResult(
            passed=False, severity=dg.AssetCheckSeverity.WARN,
            description="no identity candidate audited: add the `identity` candidate to check the pipeline itself",
        )  # fmt: skip
    return dg.AssetCheckResult(
        passed=not moved, description="every quality delta is exactly zero" if not moved else "; ".join(moved[:10]),
        metadata={"moved": len(moved)},
    )  # fmt: skip
