"""`make bench`: the default audit, measured. A command, not a timed test (machines are shared and noisy).

Prints per stage wall seconds and peak memory, the eval stage's tokens/s next to a bare forward
pass over the same tokens in the same process (their ratio is the harness overhead), and the
artifact's size against the base checkpoint's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import dagster as dg
import torch

from quant_pipeline.cli.audit import run_audit, summarize
from quant_pipeline.core.paths import DEFAULT_CALIBRATION, DEFAULT_POLICY
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.automation import CALIBRATION_STAGES
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.evaluation.generation import generate_greedy, greedy_batches, right_padded
from quant_pipeline.evaluation.suite import (
    GENERATION_FILE,
    TASK_CATEGORY,
    limited,
    read_jsonl,
    run_harness,
    score_output,
)
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.release.governing import pin_policy
from quant_pipeline.serving.server import Server, greedy_generate


def bare_forward_tokens_per_second(model, tokenizer, texts: list[str], batch_size: int = 8) -> tuple[float, int]:
    """Forward passes only (no harness) over the given texts, batched like the harness does."""
    encoded = sorted((tokenizer(t)["input_ids"] for t in texts), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i : i + batch_size]
            ids, mask = right_padded(batch, pad)
            model(input_ids=ids, attention_mask=mask)
            tokens += sum(len(seq) for seq in batch)
    seconds = time.perf_counter() - t0
    return tokens / seconds, tokens


def bare_generate_tokens_per_second(
    model, tokenizer, prompts: list[str], budgets: list[int], batch_size: int = 8
) -> float:
    """`model.generate` alone on the same pre-tokenized batches the runner builds: no templating,
    decoding or scoring in the timed part (prompt + new tokens per second)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    tokens, seconds = 0, 0.0
    for _, enc, budget in greedy_batches(tokenizer, prompts, budgets, batch_size):
        torch.manual_seed(0)
        t0 = time.perf_counter()
        with torch.inference_mode():
            gen = model.generate(**enc, do_sample=False, max_new_tokens=budget, pad_token_id=pad, num_beams=1)
        seconds += time.perf_counter() - t0
        new = gen[:, enc["input_ids"].shape[1] :]
        for row in range(new.shape[0]):
            ids = new[row].tolist()
            tokens += int(enc["attention_mask"][row].sum()) + (
                ids.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in ids else len(ids)
            )
    return tokens / seconds


def bench_slices(model, tokenizer, limit: int | None) -> list[dict]:
    """Per slice: items, wall seconds, tokens/s, and the same work done bare. Harness slices: a bare
    forward pass over exactly the same request tokens. Generation slices (greedy + scoring): a bare
    `model.generate` over the same batches. The ratio is the throughput the eval keeps."""

    rows = []
    for task, category in TASK_CATEGORY.items():
        t0 = time.perf_counter()
        _, items, stats = run_harness(model, tokenizer, "bench", limit, 8, tasks=[task])
        seconds = time.perf_counter() - t0
        bare, _ = bare_forward_tokens_per_second(model, tokenizer, stats["request_texts"])
        tps = stats["eval_tokens"] / seconds
        rows.append(
            {"slice": category, "items": len(items), "seconds": seconds, "tps": tps, "bare": bare, "ratio": tps / bare}
        )
    items = limited(read_jsonl(GENERATION_FILE), "slice", limit)
    for slice_name in dict.fromkeys(i["slice"] for i in items):
        chosen = [i for i in items if i["slice"] == slice_name]
        prompts, budgets = [i["prompt"] for i in chosen], [i["max_new_tokens"] for i in chosen]
        t0 = time.perf_counter()
        outs = generate_greedy(model, tokenizer, prompts, budgets)
        for item, out in zip(chosen, outs, strict=True):
            score_output(item, out["output"], out["output_ids"])
        seconds = time.perf_counter() - t0
        tps = sum(o["prompt_tokens"] + len(o["output_ids"]) for o in outs) / seconds
        bare = bare_generate_tokens_per_second(model, tokenizer, prompts, budgets)
        rows.append(
            {
                "slice": slice_name,
                "items": len(chosen),
                "seconds": seconds,
                "tps": tps,
                "bare": bare,
                "ratio": tps / bare,
            }
        )
    return rows


def serving_overhead(tracker, store: Path, artifact: dict, requests: int = 20, max_new_tokens: int = 32) -> str:
    """p50/p95 latency of `Server.generate` (provenance JSONL + MLflow trace) vs `greedy_generate`."""
    prompts = [i["prompt"] for i in read_jsonl(GENERATION_FILE) if i["slice"] in ("should_not_refuse", "json_format")][
        :requests
    ]
    server = Server(tracker, artifact["model_name"], ref=artifact["artifact_id"], store_dir=store)
    model, tokenizer = load_model(Path(artifact["path"]))
    greedy_generate(model, tokenizer, prompts[0], max_new_tokens)  # warm-up, both paths
    server.generate(prompts[0], max_new_tokens)
    bare, logged = [], []
    for prompt in prompts:  # interleaved, so machine noise hits both alike
        t0 = time.perf_counter()
        greedy_generate(model, tokenizer, prompt, max_new_tokens)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        server.generate(prompt, max_new_tokens)
        logged.append(time.perf_counter() - t0)

    def pct(xs, q):
        return statistics.quantiles(xs, n=100, method="inclusive")[q - 1]

    return (
        f"{requests} requests, {max_new_tokens} new tokens max\n"
        f"bare    p50 {statistics.median(bare):.3f} s  p95 {pct(bare, 95):.3f} s\n"
        f"logged  p50 {statistics.median(logged):.3f} s  p95 {pct(logged, 95):.3f} s\n"
        f"ratio   p50 {statistics.median(logged) / statistics.median(bare):.3f}  "
        f"p95 {pct(logged, 95) / pct(bare, 95):.3f}  (goal <= 1.05 at p50)"
    )


def cli_latency(work: Path, tracker, artifact_id: str, model_name: str) -> list[tuple[str, float, int]]:
    """Wall seconds of the CLI verbs that do no model work, each in a fresh process as a person runs them
    (the goal is <= 1 s; verbs that read the MLflow registry pay MLflow's own import, about 2 s here)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "QP_STORE_DIR": str(work / "store"), "QP_MLFLOW_TRACKING_URI": tracker.uri}
    exe = [sys.executable, "-m", "quant_pipeline.cli"]
    rows = []
    for argv in (
        ["--help"],
        ["no-such-verb"],
        ["verify", artifact_id],
        ["show", artifact_id],
        ["verify-trail", model_name],
    ):
        t0 = time.perf_counter()
        done = subprocess.run([*exe, *argv], env=env, capture_output=True, check=False)
        rows.append((" ".join(argv), time.perf_counter() - t0, done.returncode))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quant_pipeline.bench")
    parser.add_argument("--eval-limit", type=int, default=None, help="items per eval task")
    parser.add_argument("--calibration-samples", type=int, default=None)
    parser.add_argument(
        "--reaudit-only",
        action="store_true",
        help="stop after the cold/re-audit ratios and sizes (skip per-slice and serving)",
    )
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="qp-bench-"))
    calibration = Path(shutil.copy(DEFAULT_CALIBRATION, work / "calibration.jsonl"))
    policy = Path(shutil.copy(DEFAULT_POLICY, work / "policy.yaml"))
    overrides: dict = {
        "store_dir": str(work / "store"),
        "eval_limit": args.eval_limit,
        "calibration_file": str(calibration),
        "policy_file": str(policy),
    }
    if args.calibration_samples:
        overrides["recipe"] = Recipe(
            **{**AuditSettings.from_env().recipe.model_dump(), "calibration_samples": args.calibration_samples}
        )
    print(f"bench store: {work} (cold: nothing reused)")
    tracker = MlflowTracker(tracking_uri=f"sqlite:///{work}/mlflow.db", artifact_root=(work / "mlartifacts").as_uri())
    timings = {}
    with dg.instance_for_test(temp_dir=str(work)) as instance:

        def timed(name, selection=None):
            t0 = time.perf_counter()
            res = run_audit(overrides, instance=instance, tracker=tracker, selection=selection)
            timings[name] = time.perf_counter() - t0
            return res

        result = timed("cold full audit")
        print("\n== cold audit, per stage ==")
        print(summarize(result))
        lines = calibration.read_text().splitlines()
        calibration.write_text("\n".join(reversed(lines)) + "\n")  # same texts, other samples used
        reaudit = timed("re-audit after calibration change", CALIBRATION_STAGES)
        print("\n== re-audit after a calibration change, per stage ==")
        print(summarize(reaudit))
        policy.write_text(policy.read_text().replace("name: ", "name: changed-", 1))
        model_name = result.output_for_node("quantized_artifact")["model_name"]
        pin_policy(work / "store", tracker, model_name, policy, "make bench", "time a re-judgement")  # on the record
        timed("re-audit after policy change", ["delta_report", "approval"])
    print("\n== incremental re-audit (same run) ==")
    cold = timings["cold full audit"]
    for name, seconds in timings.items():
        print(f"{name:<36} {seconds:>8.1f} s  {seconds / cold:>6.3f} of cold")

    base = result.output_for_node("base_checkpoint")
    artifact = result.output_for_node("quantized_artifact")
    print("\n== size ==")
    print(
        f"base {base['size_bytes'] / 2**20:.1f} MB, artifact {artifact['size_bytes'] / 2**20:.1f} MB, "
        f"ratio {artifact['size_bytes'] / base['size_bytes']:.3f}"
    )

    print("\n== CLI verbs without model work (fresh process each; goal <= 1 s) ==")
    for verb, seconds, code in cli_latency(work, tracker, artifact["artifact_id"], artifact["model_name"]):
        print(f"quant-pipeline {verb:<48} {seconds:>6.2f} s  exit {code}")
    if args.reaudit_only:
        return 0
    print("\n== eval stage per slice (base and quantized, same process) ==")
    print(f"{'model':<10} {'slice':<18} {'items':>5} {'seconds':>8} {'tok/s':>8} {'bare fwd tok/s':>15} {'ratio':>6}")
    for label, path in (("base", base["path"]), ("quantized", artifact["path"])):
        model, tokenizer = load_model(Path(path))
        for row in bench_slices(model, tokenizer, args.eval_limit):
            ratio = f"{row['ratio']:.2f}" if row["ratio"] else "n/a"
            bare = f"{row['bare']:.1f}" if row["bare"] else "n/a"
            print(
                f"{label:<10} {row['slice']:<18} {row['items']:>5} {row['seconds']:>8.1f} {row['tps']:>8.1f} "
                f"{bare:>15} {ratio:>6}"
            )
    print("\n== serving overhead: logged requests vs the bare generate call (same artifact) ==")
    print(serving_overhead(tracker, work / "store", artifact))
    return 0  # a failing gate is a finding of the audit, not a failure of the benchmark


if __name__ == "__main__":
    raise SystemExit(main())
