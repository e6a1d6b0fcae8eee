"""The evaluation suite: the same tasks, run the same way, on the base and the quantized model.

Three parts, all on the already-loaded model:
- lm-evaluation-harness tasks declared in YAML and shipped with the package: golden multiple-choice
  slices (log-likelihood accuracy) and perplexity on held-out text;
- our behaviour runner (greedy, fixed seed): JSON format, tool calls, refusal and over-refusal,
  long-form drift, toxicity and PII in outputs, paired bias probes;
- cost: load and generation peak memory, per-request latency percentiles, tokens per second.
The base run also stores its final hidden states on its own probe texts (hash-recorded), so the
quantized run measures exact agreement with the base (top-1 next-token agreement, KL divergence,
identical generations, first divergence) by applying the base's output embeddings to them, without
running the base model again: a calibration re-audit runs only the quantized model's forwards.

Results are keyed by (model hash, suite hash, runtime hash, limits): identical inputs reuse the
stored tables instead of re-running the model.
"""

import json
import os
import time
from pathlib import Path

import pandas as pd

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import hash_directory, sha256_file
from quant_pipeline.core.paths import EVALS_DIR
from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.progress import Progress
from quant_pipeline.evaluation import behaviour
from quant_pipeline.evaluation.generation import (
    agreement_with_reference,
    chat_text,
    execution,
    generate_greedy,
    latency_probe,
    reference_states,
    sequence_logprob,
)
from quant_pipeline.evaluation.pii import find_pii
from quant_pipeline.evaluation.statistics import first_divergence

TASK_CATEGORY = {
    "qp_golden_facts": "facts",
    "qp_golden_arithmetic": "arithmetic",
    "qp_golden_reading": "reading",
    "qp_golden_non_english": "non_english",
    "qp_heldout_ppl": "heldout",
}
RESULT_COLUMNS = ["model", "task", "category", "metric", "value", "stderr"]
GOLDEN_FILE = EVALS_DIR / "golden_v1.jsonl"  # the multiple-choice items (read by qp_tasks.load_golden)
GENERATION_FILE = EVALS_DIR / "generation_v1.jsonl"
BIAS_FILE = EVALS_DIR / "bias_pairs_v1.jsonl"
LATENCY_REQUESTS = 16
# Per-item metric columns each generation slice produces (aggregated as the slice mean).
SLICE_METRICS = {
    "json_format": ["format_validity"],
    "tool_call": ["tool_call_validity"],
    "should_refuse": ["refusal_rate"],
    "should_not_refuse": ["over_refusal_rate"],
}
OUTPUT_METRICS = ["toxicity_rate", "pii_rate", "repetition_rate", "degeneration_rate"]
AGREEMENT_METRICS = ["top1_agreement", "kl_divergence", "exact_match", "prefix_agreement"]


def suite_hash() -> str:
    return hash_directory(EVALS_DIR)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def limited(items: list[dict], key: str, limit: int | None) -> list[dict]:
    """At most `limit` items per slice, in file order (the harness's `limit` semantics)."""
    if limit is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for item in items:
        seen[item[key]] = seen.get(item[key], 0) + 1
        if seen[item[key]] <= limit:
            out.append(item)
    return out


def _with_progress(hflm: type, label: str) -> type:
    """lm-eval's Hugging Face model reporting to our progress (a bar on a terminal, a run-log line every
    15 s, tokens/s) in place of its own bars. Requests are counted as lm-eval queues them (rolling
    perplexity queues its windows batch by batch, so the total grows) and as forward passes score them
    (padding included in the tokens); requests that share a context are scored by one row."""

    class ProgressLM(hflm):
        progress: Progress | None = None

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            if self.progress is None:
                self.progress = Progress(f"{label} harness", 0, "requests")
            self.progress.extend(len(requests))
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

        def _model_call(self, inps, attn_mask=None, labels=None):
            logits = super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            if self.progress is not None:
                self.progress.advance(min(inps.shape[0], self.progress.total - self.progress.done), int(inps.numel()))
            return logits

        def close_progress(self) -> None:
            if self.progress is not None:
                self.progress.advance(self.progress.total - self.progress.done)
                self.progress.close()

    return ProgressLM


def run_harness(
    model, tokenizer, label: str, limit: int | None, batch_size: int, tasks: list[str] | None = None
) -> tuple[list[dict], list[dict], dict]:
    """The lm-eval tasks: metric rows, per-item rows, and throughput (with the request texts)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # lm-eval records the git commit of the working directory (the user's, not what ran: the suite hash
    # names that), and its `git describe` prints "fatal: not a git repository" outside one.
    lm_eval.evaluator.get_git_commit_hash = lambda: None
    # Its environment report runs `pip list` in a new interpreter (torch's collect_env): 0.44 s a harness run, 2.5 s
    # the first time in a process, twice per audit. Nothing reads it: the runtime fingerprint (core/runtime.py)
    # records the environment that was audited.
    lm_eval.evaluator.add_env_info = lambda results: None

    lm = _with_progress(HFLM, label)(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks or list(TASK_CATEGORY),
        task_manager=TaskManager(include_path=str(EVALS_DIR), include_defaults=False),
        limit=limit,
        log_samples=True,
        random_seed=0,
        numpy_random_seed=0,
        torch_random_seed=0,
        fewshot_random_seed=0,
    )
    seconds = time.perf_counter() - t0
    lm.close_progress()
    rows, items, texts, tokens = [], [], [], 0
    for task, metrics in out["results"].items():
        for key, value in metrics.items():
            if "," not in key or key.split(",")[0].endswith("_stderr"):
                continue
            metric = key.split(",")[0]
            stderr = metrics.get(f"{metric}_stderr,{key.split(',', 1)[1]}")
            rows.append(
                {
                    "model": label,
                    "task": task,
                    "category": TASK_CATEGORY[task],
                    "metric": metric,
                    "value": float(value),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else float("nan"),
                }
            )
    for task, samples in out["samples"].items():
        for s in samples:
            text = "".join(str(a) for arg in s["arguments"] for a in (arg if isinstance(arg, (list, tuple)) else [arg]))
            texts.append(text)
            tokens += len(tokenizer(text)["input_ids"])
            doc = s["doc"]
            item = {
                "model": label,
                "task": task,
                "category": TASK_CATEGORY[task],
                "item_id": str(doc.get("id", s["doc_id"])),
                **{m: float(s[m]) for m in ("acc", "acc_norm") if m in s},
            }
            # The text agreement is measured on: the question with its correct answer, or the held-out text.
            item["probe_text"] = (
                f"Question: {doc['question']}\nAnswer: {doc['choices'][doc['answer']]}"
                if "choices" in doc
                else doc.get("text", "")
            )
            items.append(item)
    stats = {
        "eval_seconds": round(seconds, 2),
        "eval_tokens": tokens,
        "eval_tokens_per_second": round(tokens / seconds, 1) if seconds else 0.0,
        "request_texts": texts,
    }
    return rows, items, stats


def score_output(item: dict, text: str, ids: list[int]) -> dict:
    """Per-item behaviour scores for one generated output (1.0 = yes, 0.0 = no)."""
    scores = {
        "toxicity_rate": float(behaviour.is_toxic(text)),
        "pii_rate": float(bool(find_pii(text))),
        "repetition_rate": behaviour.repetition_rate(ids),
        "degeneration_rate": float(behaviour.is_degenerate(ids)),
    }
    if item["slice"] == "json_format":
        scores["format_validity"] = float(behaviour.check_json_format(text, item["schema"])[0])
    elif item["slice"] == "tool_call":
        scores["tool_call_validity"] = float(behaviour.check_tool_call(text, item["tool"])[0])
    elif item["slice"] == "should_refuse":
        scores["refusal_rate"] = float(behaviour.is_refusal(text))
    elif item["slice"] == "should_not_refuse":
        scores["over_refusal_rate"] = float(behaviour.is_refusal(text))
    return scores


def run_behaviour(
    model, tokenizer, label: str, limit: int | None, max_new_tokens: int | None
) -> tuple[list[dict], dict]:
    """Greedy generations for every behaviour prompt, scored; plus generation peak memory."""
    items = limited(read_jsonl(GENERATION_FILE), "slice", limit)
    budgets = [min(i["max_new_tokens"], max_new_tokens or i["max_new_tokens"]) for i in items]
    with StageMeter() as meter:
        prompts = [i["prompt"] for i in items]
        outputs = generate_greedy(model, tokenizer, prompts, budgets, label=f"{label} behaviour suite")
    rows = []
    for item, out in zip(items, outputs, strict=False):
        rows.append(
            {
                "model": label,
                "task": "qp_behaviour",
                "category": item["slice"],
                "item_id": item["id"],
                "prompt": item["prompt"],
                "output": out["output"],
                "output_ids": out["output_ids"],
                "new_tokens": len(out["output_ids"]),
                "probe_text": chat_text(tokenizer, item["prompt"]) + out["output"],
                **score_output(item, out["output"], out["output_ids"]),
            }
        )
    return rows, {"generation_peak_rss_mb": meter.peak_rss_mb, "generation_seconds": meter.wall_s}


def run_bias(model, tokenizer, label: str, limit: int | None) -> list[dict]:
    """Paired prompts that differ only in a demographic term: the log-likelihood gap per pair."""
    pairs = limited(read_jsonl(BIAS_FILE), "axis", limit)
    a = sequence_logprob(model, tokenizer, [p["text_a"] for p in pairs])
    b = sequence_logprob(model, tokenizer, [p["text_b"] for p in pairs])
    return [
        {"model": label, "task": "qp_bias", "category": f"bias_{p['axis']}", "item_id": p["id"], "bias_gap": abs(x - y)}
        for p, x, y in zip(pairs, a, b, strict=False)
    ]


def aggregate_items(items: pd.DataFrame, label: str) -> list[dict]:
    """Slice means of the per-item metric columns of the behaviour and bias tables."""
    rows = []
    metric_cols = [
        c
        for c in items.columns
        if c
        in (
            *OUTPUT_METRICS,
            *AGREEMENT_METRICS,
            "bias_gap",
            "format_validity",
            "tool_call_validity",
            "refusal_rate",
            "over_refusal_rate",
        )
    ]
    for (task, category), group in items.groupby(["task", "category"]):
        for col in metric_cols:
            values = group[col].dropna()
            if len(values):
                stderr = float(values.std(ddof=1) / len(values) ** 0.5) if len(values) > 1 else float("nan")
                rows.append(
                    {
                        "model": label,
                        "task": task,
                        "category": category,
                        "metric": col,
                        "value": float(values.mean()),
                        "stderr": stderr,
                    }
                )
    return rows


def run_suite(
    model, tokenizer, label: str, limit: int | None = None, batch_size: int = 8, max_new_tokens: int | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Every part of the suite on one loaded model: (metric table, per-item table, stats)."""
    parts, t0 = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        parts[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
        t0 = time.perf_counter()

    harness_rows, harness_items, stats = run_harness(model, tokenizer, label, limit, batch_size)
    lap("harness")
    behaviour_items, gen_stats = run_behaviour(model, tokenizer, label, limit, max_new_tokens)
    lap("behaviour")
    bias_items = run_bias(model, tokenizer, label, limit)
    lap("bias")
    probes = [i["prompt"] for i in limited(read_jsonl(GENERATION_FILE), "slice", 2)][:LATENCY_REQUESTS]
    latency = latency_probe(model, tokenizer, probes, max_new_tokens=min(32, max_new_tokens or 32), label=label)
    lap("latency")
    items = pd.DataFrame(harness_items + behaviour_items + bias_items)
    cost = {
        **{k: latency[k] for k in ("latency_p50_s", "latency_p95_s", "latency_p99_s", "tokens_per_second")},
        "generation_peak_rss_mb": round(gen_stats["generation_peak_rss_mb"], 1),
    }
    rows = harness_rows + aggregate_items(items.drop(columns=["acc", "acc_norm"], errors="ignore"), label)
    rows += [
        {"model": label, "task": "qp_cost", "category": "cost", "metric": k, "value": float(v), "stderr": float("nan")}
        for k, v in cost.items()
    ]
    return (
        pd.DataFrame(rows, columns=RESULT_COLUMNS),
        items,
        {
            **stats,
            **cost,
            "latency_requests": latency["requests"],
            "part_seconds": parts,
            "execution": execution(model, batch_size),
        },
    )


def with_reference(items: pd.DataFrame, model, tokenizer, batch_size: int) -> tuple[pd.DataFrame, dict]:
    """The base's final hidden states on its own probe texts (MC question + answer, held-out text, prompt
    + the base's generation), and the items with `ref_index` pointing into them (-1: no probe)."""
    has_probe = (
        items["probe_text"].map(lambda t: isinstance(t, str) and bool(t))
        if "probe_text" in items
        else pd.Series(False, index=items.index)
    )
    items = items.copy()
    items["ref_index"] = -1
    items.loc[has_probe, "ref_index"] = range(int(has_probe.sum()))
    reference = reference_states(model, tokenizer, items.loc[has_probe, "probe_text"].tolist(), batch_size=batch_size)
    return items, reference


def add_agreement(
    items: pd.DataFrame, base_items: pd.DataFrame, reference: dict, base_head, quant_model, batch_size: int
) -> pd.DataFrame:
    """Agreement of the quantized model with the base, per item, on the base's own text.

    Teacher-forced on the same tokens for top-1 and KL (the base's side read from what its
    evaluation stored: per-position summaries, or its final hidden states through its output
    embeddings when the variant has an output layer of its own); generated token ids compared for
    identity and first divergence."""
    base = base_items.set_index(["category", "item_id"])
    scores = agreement_with_reference(base_head, quant_model, reference, batch_size=batch_size)
    by_key = {key: scores[int(i)] for key, i in base["ref_index"].items() if i >= 0}
    items = items.copy()
    for col in AGREEMENT_METRICS + ["first_divergence"]:
        items[col] = float("nan")
    for idx, r in items.iterrows():
        key = (r["category"], r["item_id"])
        if key in by_key:
            items.loc[idx, "top1_agreement"] = by_key[key]["top1_agreement"]
            items.loc[idx, "kl_divergence"] = by_key[key]["kl_divergence"]
        if r["task"] == "qp_behaviour" and key in base.index:
            ref, out = list(base.loc[key, "output_ids"]), list(r["output_ids"])
            div = first_divergence(ref, out)
            items.loc[idx, "exact_match"] = float(div is None)
            items.loc[idx, "first_divergence"] = float(len(ref) if div is None else div)
            items.loc[idx, "prefix_agreement"] = 1.0 if div is None else div / max(len(ref), 1)
    return items


def load_reference(base_eval: dict) -> dict:
    """The base's stored hidden states, verified against the hash its evaluation recorded."""
    from safetensors.torch import load_file

    path = Path(base_eval["reference_path"])
    if not path.exists() or sha256_file(path) != base_eval["reference_sha256"]:
        raise AuditInputError(
            f"{path} does not match the hash recorded by base evaluation {base_eval['key']}: "
            "re-materialize base_eval_results"
        )
    return load_file(path)
