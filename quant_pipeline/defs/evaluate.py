"""Evaluation: the same suite, run the same way, on the base and the quantized model.

Results are keyed by (model hash, suite hash, runtime hash, limits): identical inputs reuse the
stored tables instead of re-running the model. The base run also stores the reference states the
quantized run measures its agreement against (see `evaluation.suite`).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pandas as pd
from safetensors.torch import save_file

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.hashing import canonical_hash, sha256_file
from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.progress import log_progress
from quant_pipeline.core.records import EvalRecord
from quant_pipeline.core.store import atomic_file
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import AUDITS, MODELS, stage_run
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.evaluation.generation import plan
from quant_pipeline.evaluation.suite import (
    AGREEMENT_METRICS,
    add_agreement,
    aggregate_items,
    load_reference,
    run_suite,
    suite_hash,
    with_reference,
)
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.output_layer import load_output_layer
from quant_pipeline.models.placement import CPU


@dataclass(frozen=True)
class EvalTarget:
    """What one evaluation runs on: the base checkpoint, or a quantized artifact (verified before loading)."""

    label: str
    model_name: str
    path: str
    content_hash: str
    tags: dict
    artifact_id: str | None = None
    base_path: str | None = None

    @classmethod
    def base(cls, checkpoint: dict) -> "EvalTarget":
        tags = {"base_hash": checkpoint["hash"]}
        return cls("base", checkpoint["model_name"], checkpoint["path"], checkpoint["hash"], tags)

    @classmethod
    def quantized(cls, artifact: dict) -> "EvalTarget":
        aid = artifact["artifact_id"]
        return cls(
            "quantized", artifact["model_name"], artifact["path"], artifact["content_hash"], {"artifact_id": aid},
            artifact_id=aid, base_path=artifact["base_path"],
        )  # fmt: skip


def evaluate_checkpoint(
    context: dg.AssetExecutionContext,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    target: EvalTarget,
    runtime_hash: str,
    base_eval: dict | None = None,
) -> dg.MaterializeResult:
    """Evaluate one checkpoint (or reuse an identical earlier evaluation) and log it."""
    suite = suite_hash()
    key_inputs = {
        "model": target.content_hash, "suite": suite, "runtime": runtime_hash, "limit": settings.eval_limit,
        "max_new_tokens": settings.eval_max_new_tokens, "base": base_eval and base_eval["key"],
        "reference": "hidden_states", **plan(settings.eval_batch_size),
    }  # fmt: skip
    where = settings.placement
    if where != CPU:  # another device or dtype gives other numbers; CPU keys are as they were before placement
        key_inputs["placement"] = where.record()
    key = canonical_hash(key_inputs)[:16]
    store = settings.store
    out_dir = store.eval_dir(key)
    reused_from = None
    force = context.run.tags.get("quant_pipeline/force_reeval") == "true"  # the periodic re-audit
    with StageMeter() as meter:
        if (out_dir / "record.json").exists() and not force:
            record = EvalRecord.read(out_dir / "record.json").dump()
            reused_from = record["dagster_run_id"]
        else:
            if target.artifact_id is not None:
                verify_artifact(store, target.artifact_id)  # never evaluate bytes other than the recorded ones
            with StageMeter() as load_meter:
                model, tokenizer = load_model(Path(target.path), settings.trust_remote_code, where)
            with log_progress(context.log.info):  # a line in the run log at least every 15 s
                results, items, stats = run_suite(
                    model,
                    tokenizer,
                    target.label,
                    settings.eval_limit,
                    settings.eval_batch_size,
                    settings.eval_max_new_tokens,
                )
            stats.pop("request_texts")
            stats["execution"] |= where.record()  # the gate compares base and quantized placements
            load_row = {
                "model": target.label, "task": "qp_cost", "category": "cost", "metric": "load_peak_rss_mb",
                "value": round(load_meter.peak_rss_mb, 1), "stderr": float("nan"),
            }  # fmt: skip
            results = pd.concat([results, pd.DataFrame([load_row])], ignore_index=True)
            if base_eval is None:  # the reference every quantized variant's agreement is measured against
                t0 = time.perf_counter()
                with log_progress(context.log.info):
                    items, reference = with_reference(items, model, tokenizer, settings.eval_batch_size)
                stats["part_seconds"]["reference_seconds"] = round(time.perf_counter() - t0, 2)
                with atomic_file(out_dir / "reference.safetensors") as tmp:
                    save_file(reference, tmp)
                stats["reference_sha256"] = sha256_file(out_dir / "reference.safetensors")
            else:
                t0 = time.perf_counter()
                # the base's output layer alone (models/output_layer.py): no forward pass of the base runs here
                base_head = load_output_layer(Path(target.base_path), settings.trust_remote_code, where)
                with log_progress(context.log.info):
                    items = add_agreement(
                        items,
                        pd.read_parquet(base_eval["items_path"]),
                        load_reference(base_eval),
                        base_head,
                        model,
                        settings.eval_batch_size,
                    )
                del base_head
                stats["agreement_reference_sha256"] = base_eval["reference_sha256"]
                stats["part_seconds"]["agreement_seconds"] = round(time.perf_counter() - t0, 2)
                results = pd.concat(
                    [
                        results,
                        pd.DataFrame(
                            aggregate_items(
                                items[["task", "category", *AGREEMENT_METRICS]].assign(model=target.label), target.label
                            )
                        ),
                    ],
                    ignore_index=True,
                )
            for name, table in (("results.parquet", results), ("items.parquet", items)):
                with atomic_file(out_dir / name) as tmp:
                    table.to_parquet(tmp)
            record = EvalRecord(
                key=key, model_hash=target.content_hash, suite_hash=suite, runtime_hash=runtime_hash,
                limit=settings.eval_limit, label=target.label, dagster_run_id=context.run.run_id, **stats,
            )  # fmt: skip
            record.write(out_dir / "record.json")
            record = record.dump()
    results = pd.read_parquet(out_dir / "results.parquet")
    record = {
        **record,
        "results_path": str(out_dir / "results.parquet"),
        "items_path": str(out_dir / "items.parquet"),
        **({"reference_path": str(out_dir / "reference.safetensors")} if base_eval is None else {}),
        "reused_from_run": reused_from,
        "perf": meter.metadata(),
    }
    with stage_run(
        context, mlflow, meter, target.model_name, f"{target.label}_eval_results", suite_hash=suite, **target.tags
    ) as run:
        run.log_params({"suite_hash": suite, "limit": settings.eval_limit, "reused_from_run": reused_from})
        run.log_metrics(
            {f"{r.metric}/{r.category}": r.value for r in results.itertuples()}
            | {k: record[k] for k in ("eval_seconds", "eval_tokens", "eval_tokens_per_second")}
            | meter.metadata()
        )
        run.log_file(out_dir / "results.parquet")
        run.log_file(out_dir / "items.parquet")
    return dg.MaterializeResult(
        value=record,
        metadata={
            "results": dg.MetadataValue.md(results.to_markdown(index=False, floatfmt=".4f")),
            "rows": len(results),
            "suite_hash": suite,
            "reused_from_run": reused_from or "no (evaluated in this run)",
            "eval_tokens_per_second": record["eval_tokens_per_second"],
            "latency_p50_s": record.get("latency_p50_s"),
            "part_seconds": dg.MetadataValue.json({} if reused_from else record.get("part_seconds", {})),
            "path": dg.MetadataValue.path(str(out_dir)),
            "eval_dir": dg.MetadataValue.path(str(out_dir)),  # `path` may show the IO manager's pickle instead
            **meter.metadata(),
            **run.metadata(),
        },
    )


@dg.asset(group_name="audit", kinds={"pandas", "parquet"}, partitions_def=MODELS)
def base_eval_results(
    context: dg.AssetExecutionContext,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    base_checkpoint: dict,
    runtime_environment: dict,
) -> dg.MaterializeResult:
    """The suite on the full-precision base model: the reference every quantized variant is judged against."""
    return evaluate_checkpoint(context, settings, mlflow, EvalTarget.base(base_checkpoint), runtime_environment["hash"])


@dg.asset(group_name="audit", kinds={"pandas", "parquet"}, partitions_def=AUDITS)
def quantized_eval_results(
    context: dg.AssetExecutionContext,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    quantized_artifact: dict,
    base_eval_results: dict,
    runtime_environment: dict,
) -> dg.MaterializeResult:
    """The same suite on the quantized artifact (bytes verified first), plus its agreement with the base."""
    target = EvalTarget.quantized(quantized_artifact)
    return evaluate_checkpoint(
        context, settings, mlflow, target, runtime_environment["hash"], base_eval=base_eval_results
    )
