"""Stage 5 — eval results: the same suite, run the same way, on the base and the quantized model.

The suite is lm-evaluation-harness tasks declared in YAML and shipped with the package (golden
multiple-choice slices plus held-out perplexity), run on the already-loaded model via `HFLM`.
Results are keyed by (model hash, suite hash, runtime hash, item limit): identical inputs reuse
the stored table instead of re-running the model.
"""


import json
import os
import time
from pathlib import Path

import dagster as dg
import pandas as pd

from quant_pipeline.perf import StageMeter
from quant_pipeline.settings import EVALS_DIR, AuditSettings
from quant_pipeline.storage import canonical_hash, hash_directory, write_json_atomic
from quant_pipeline.tracking import MlflowTracker

TASK_CATEGORY = {
    "qp_golden_facts": "facts",
    "qp_golden_arithmetic": "arithmetic",
    "qp_golden_reading": "reading",
    "qp_golden_non_english": "non_english",
    "qp_heldout_ppl": "heldout",
}
RESULT_COLUMNS = ["model", "task", "category", "metric", "value", "stderr"]


def suite_hash() -> str:
    return hash_directory(EVALS_DIR)


def load_model(path: Path, trust_remote_code: bool = False):
    """Load a checkpoint for evaluation: safetensors only, no remote code unless opted in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    kwargs = {"device_map": "cuda" if torch.cuda.is_available() else "cpu", "use_safetensors": True, "trust_remote_code": trust_remote_code}
    if not (Path(path) / "config.json").read_text().count("quantization_config"):
        kwargs["dtype"] = torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.eval()
    return model, tokenizer


def run_suite(model, tokenizer, label: str, limit: int | None = None, batch_size: int = 8) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Run every shipped task; return (metric table, per-item table, throughput stats).

    The stats include the request texts, so a benchmark can time a bare forward pass over
    exactly the tokens the harness scored."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(TASK_CATEGORY),
        task_manager=TaskManager(include_path=str(EVALS_DIR), include_defaults=False),
        limit=limit,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    seconds = time.perf_counter() - t0
    rows, items, texts, tokens = [], [], [], 0
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(f"{metric}_stderr,{key.split(',', 1)[1]}")
            rows.append({"model": label, "task": task, "category": TASK_CATEGORY[task], "metric": metric, "value": float(value), "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan")})
    for task, samples in out["samples"].items():
        for s in samples:
            text = "".join(str(a) for arg in s["arguments"] for a in (arg if isinstance(arg, (list, tuple)) else [arg]))
            texts.append(text)
            tokens += len(tokenizer(text)["input_ids"])
            scores = {m: s[m] for m in ("acc", "acc_norm") if m in s}
            items.append({"model": label, "task": task, "category": TASK_CATEGORY[task], "item_id": str(s["doc"].get("id", s["doc_id"])), **scores})
    stats = {"eval_seconds": round(seconds, 2), "eval_tokens": tokens, "eval_tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0, "request_texts": texts}
    return pd.DataFrame(rows, columns=RESULT_COLUMNS), pd.DataFrame(items), stats


def evaluate_checkpoint(context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, *, label: str, model_name: str, model_path: str, model_hash: str, runtime_hash: str, tags: dict) -> dg.MaterializeResult:
    """Evaluate one checkpoint (or reuse an identical earlier evaluation) and log it."""
    suite = suite_hash()
    key = canonical_hash({"model": model_hash, "suite": suite, "runtime": runtime_hash, "limit": settings.eval_limit})[:16]
    out_dir = settings.store / "evals" / key
    reused_from = None
    force = context.run.tags.get("quant_pipeline/force_reeval") == "true"  # the periodic re-audit
    with StageMeter() as meter:
        if (out_dir / "record.json").exists() and not force:
            record = json.loads((out_dir / "record.json").read_text())
            reused_from = record["dagster_run_id"]
        else:
            if label == "quantized":
                from quant_pipeline.quantized_artifact import verify_artifact

                verify_artifact(Path(model_path))  # never evaluate bytes other than the recorded ones
            model, tokenizer = load_model(Path(model_path), settings.trust_remote_code)
            results, items, stats = run_suite(model, tokenizer, label, settings.eval_limit, settings.eval_batch_size)
            stats.pop("request_texts")
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, table in (("results.parquet", results), ("items.parquet", items)):
                table.to_parquet(out_dir / f".{name}.tmp")
                os.replace(out_dir / f".{name}.tmp", out_dir / name)
            record = {"key": key, "model_hash": model_hash, "suite_hash": suite, "runtime_hash": runtime_hash, "limit": settings.eval_limit, "label": label, "dagster_run_id": context.run.run_id, **stats}
            write_json_atomic(out_dir / "record.json", record)
    results = pd.read_parquet(out_dir / "results.parquet")
    record = {**record, "results_path": str(out_dir / "results.parquet"), "items_path": str(out_dir / "items.parquet"), "reused_from_run": reused_from, "perf": meter.metadata()}
    with mlflow.stage_run(model_name, f"{label}_eval_results", {"dagster_run_id": context.run.run_id, "suite_hash": suite, **tags}) as run:
        run.log_params({"suite_hash": suite, "limit": settings.eval_limit, "reused_from_run": reused_from})
        run.log_metrics({f"{r.metric}/{r.category}": r.value for r in results.itertuples()} | {k: record[k] for k in ("eval_seconds", "eval_tokens", "eval_tokens_per_second")} | meter.metadata())
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
            "path": dg.MetadataValue.path(str(out_dir)),
            **meter.metadata(),
            **run.metadata(),
        },
    )


@dg.asset(group_name="audit", kinds={"pandas", "parquet"})
def base_eval_results(context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, base_checkpoint: dict, runtime_environment: dict) -> dg.MaterializeResult:
    """The suite on the full-precision base model: the reference every quantized variant is judged against."""
    return evaluate_checkpoint(
        context, settings, mlflow, label="base", model_name=base_checkpoint["model_name"], model_path=base_checkpoint["path"],
        model_hash=base_checkpoint["hash"], runtime_hash=runtime_environment["hash"], tags={"base_hash": base_checkpoint["hash"]},
    )


@dg.asset(group_name="audit", kinds={"pandas", "parquet"})
def quantized_eval_results(context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, quantized_artifact: dict, runtime_environment: dict) -> dg.MaterializeResult:
    """The same suite on the quantized artifact, after verifying its bytes against its record."""
    return evaluate_checkpoint(
        context, settings, mlflow, label="quantized", model_name=quantized_artifact["model_name"], model_path=quantized_artifact["path"],
        model_hash=quantized_artifact["content_hash"], runtime_hash=runtime_environment["hash"], tags={"artifact_id": quantized_artifact["artifact_id"]},
    )
