"""`make bench`: the default audit, measured. A command, not a timed test (machines are shared and noisy).

Prints per stage wall seconds and peak memory; the re-audits after a calibration and a policy change;
the fixed cost every stage pays (process start and imports, lm-eval task building, an MLflow run, a
model load); greedy generation's tokens/s and its share of the machine's matmul roofline; the CLI
verbs' latency; the harness's tokens/s next to a bare forward pass over the same tokens; the
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
from quant_pipeline.evaluation.generation import generate_greedy, linear_layers, right_padded
from quant_pipeline.evaluation.suite import (
    GENERATION_FILE,
    TASK_CATEGORY,
    limited,
    read_jsonl,
    run_harness,
)
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.placement import CPU, Placement
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
            model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
            tokens += sum(len(seq) for seq in batch)
    seconds = time.perf_counter() - t0
    return tokens / seconds, tokens


def bench_slices(model, tokenizer, limit: int | None) -> list[dict]:
    """Per harness slice: items, wall seconds, tokens/s, and a bare forward pass over exactly the same
    request tokens. The ratio is the throughput the harness keeps."""
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
    return rows


def matmul_peak_gflops(where: Placement = CPU, size: int = 1024, repeats: int = 20) -> float:
    """The matrix-multiply rate of the placement the audit runs on (all CPU threads, or the GPU in its compute
    dtype): the roofline generation is measured against."""
    size, repeats = (size, repeats) if where == CPU else (4096, 50)
    a, b = (torch.randn(size, size, device=where.device, dtype=where.torch_dtype) for _ in range(2))
    a @ b
    _sync(where)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(where)
    return 2 * size**3 * repeats / (time.perf_counter() - t0) / 1e9


def _sync(where: Placement) -> None:
    """A GPU runs kernels asynchronously: time them only once they are done."""
    if where.device == "cuda":
        torch.cuda.synchronize()


def flops_per_token(model) -> int:
    """Two floating-point operations per weight of every linear layer, the output layer included (attention
    over the cache adds a few percent at the suite's lengths and is left out: the ratio is conservative)."""
    return 2 * sum(m.in_features * m.out_features for m in linear_layers(model))


def generation_roofline(model, tokenizer, limit: int | None, peak_gflops: float) -> dict:
    """The behaviour suite's greedy generation as the audit runs it: prompt + new tokens per second, the
    matmul rate that implies, and its share of the machine's peak."""
    items = limited(read_jsonl(GENERATION_FILE), "slice", limit)
    t0 = time.perf_counter()
    outs = generate_greedy(model, tokenizer, [i["prompt"] for i in items], [i["max_new_tokens"] for i in items])
    seconds = time.perf_counter() - t0
    tokens = sum(o["prompt_tokens"] + len(o["output_ids"]) for o in outs)
    gflops = tokens * flops_per_token(model) / seconds / 1e9
    return {"items": len(items), "seconds": seconds, "tps": tokens / seconds, "gflops": gflops,
            "ratio": gflops / peak_gflops}  # fmt: skip


FIXED_COST_PROBE = """
import json, sys, time
t = time.perf_counter()
import quant_pipeline.definitions
from lm_eval.tasks import TaskManager, get_task_dict
from quant_pipeline.core.paths import EVALS_DIR
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.evaluation.suite import TASK_CATEGORY
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.placement import placement
laps = {"imports": time.perf_counter() - t}
t = time.perf_counter()
get_task_dict(list(TASK_CATEGORY), TaskManager(include_path=str(EVALS_DIR), include_defaults=False))
laps["tasks"] = time.perf_counter() - t
t = time.perf_counter()
with MlflowTracker(tracking_uri=sys.argv[1]).stage_run("bench-fixed-cost", "bench", {}) as run:
    run.log_metrics({"x": 1.0})
laps["mlflow"] = time.perf_counter() - t
t = time.perf_counter()
load_model(sys.argv[2], where=placement(sys.argv[3]))
laps["load"] = time.perf_counter() - t
print(json.dumps(laps))
"""


def fixed_costs(tracker, model_path: Path, device: str) -> list[tuple[str, float]]:
    """What each stage pays before doing its work, in a fresh process as a stage run by the daemon pays it:
    the interpreter starting with the pipeline imported, lm-eval's task building, one MLflow run opened,
    logged and closed, a model load (the checkpoint's files in the OS's page cache)."""
    import json
    import subprocess
    import sys

    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", FIXED_COST_PROBE, tracker.uri, str(model_path), device], capture_output=True, text=True
    )
    total = time.perf_counter() - t0
    if done.returncode != 0:
        return [(f"fixed-cost probe failed: {done.stderr.strip().splitlines()[-1:]}", total)]
    laps = json.loads(done.stdout.strip().splitlines()[-1])
    return [
        ("process start + imports (pipeline, lm-eval, MLflow, torch)", total - sum(laps.values()) + laps["imports"]),
        ("lm-eval task building (all suite tasks, first time)", laps["tasks"]),
        ("one MLflow run opened, logged, closed (first time)", laps["mlflow"]),
        ("model load (the base checkpoint)", laps["load"]),
    ]


def serving_overhead(
    tracker, store: Path, artifact: dict, where: Placement, requests: int = 20, max_new_tokens: int = 32
) -> str:
    """p50/p95 latency of `Server.generate` (provenance JSONL + MLflow trace) vs `greedy_generate`."""
    prompts = [i["prompt"] for i in read_jsonl(GENERATION_FILE) if i["slice"] in ("should_not_refuse", "json_format")][
        :requests
    ]
    server = Server(tracker, artifact["model_name"], ref=artifact["artifact_id"], store_dir=store)
    model, tokenizer = load_model(Path(artifact["path"]), where=where)
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


def bench_candidates(keys: str, search: int, policy_file: str | None, eval_limit: int | None) -> int:
    """`make bench BENCH_ARGS="--candidates all --search 2"`: what `make demo` runs, cold, in a store, MLflow and
    Dagster instance of its own; per candidate its wall seconds (the first pays the shared base stages), size,
    latency and worst regression, and the whole comparison's wall time."""
    import json
    import os

    from quant_pipeline.cli.candidates import audit_candidates, parse_candidates

    work = Path(tempfile.mkdtemp(prefix="qp-bench-candidates-"))
    os.environ.update({
        "DAGSTER_HOME": str(work / "dagster"), "QP_STORE_DIR": str(work / "store"),
        "QP_MLFLOW_TRACKING_URI": f"sqlite:///{work}/mlflow.db",
    })  # fmt: skip
    overrides = {k: v for k, v in {"policy_file": policy_file, "eval_limit": eval_limit}.items() if v is not None}
    print(f"bench store: {work} (cold: nothing reused)", flush=True)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    code = audit_candidates(overrides, parse_candidates(keys), search=search, seconds=seconds)
    total = time.perf_counter() - t0
    found = sorted((work / "store").glob("reports/*/tradeoff/tradeoff.json"))
    if not found:
        print("bench: no tradeoff table was written")
        return code
    rows = {r["candidate"]: r for r in json.loads(found[0].read_text())["rows"]}
    print("\n== per candidate (one run, cold; the first candidate pays the base checkpoint and base evaluation) ==")
    print(
        "| candidate | verdict | wall s | size MiB | × base | p50 s | p95 s | tok/s | worst slice "
        "| share of tolerance |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for key, wall in seconds.items():
        r = rows.get(key)
        if r is None:
            print(f"| {key} | not compared | {wall:.0f} | | | | | | | |")
            continue
        print(
            f"| {key} | {r['verdict']} | {wall:.0f} | {r['size_bytes'] / 2**20:.1f} | {r['size_vs_base']:.3f} | "
            f"{r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | {r['tokens_per_second']:.1f} | "
            f"{r['worst_slice']} | {r['worst_share']:.2f} |"
        )
    print(f"\nwhole comparison: {total:.0f} s wall for {len(seconds)} candidates (exit {code})")
    return 0  # a candidate that fails the gate is a finding, not a failure of the benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quant_pipeline.bench")
    parser.add_argument("--eval-limit", type=int, default=None, help="items per eval task")
    parser.add_argument("--calibration-samples", type=int, default=None)
    parser.add_argument(
        "--reaudit-only",
        action="store_true",
        help="stop after the cold/re-audit ratios and sizes (skip per-slice and serving)",
    )
    parser.add_argument("--candidates", help="bench `audit --candidates` instead (keys, or all), cold")
    parser.add_argument("--search", type=int, default=0, help="with --candidates: search steps, as audit --search")
    parser.add_argument("--policy-file", help="with --candidates: the policy the candidates are judged under")
    args = parser.parse_args(argv)
    if args.candidates:
        return bench_candidates(args.candidates, args.search, args.policy_file, args.eval_limit)

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
    print("\n== fixed cost per stage ==")
    where = AuditSettings.from_env().placement
    for what, seconds in fixed_costs(tracker, Path(base["path"]), where.device):
        print(f"{what:<52} {seconds:>6.2f} s")
    print("\n== greedy generation of the behaviour suite vs the matmul roofline (goal >= 0.50) ==")
    peak = matmul_peak_gflops(where)
    on = f"{torch.get_num_threads()} threads" if where == CPU else torch.cuda.get_device_name(0)
    print(f"{where.dtype} matmul peak on {where.device}: {peak:.1f} GFLOP/s ({on})")
    for label, path in (("base", base["path"]), ("quantized", artifact["path"])):
        model, tokenizer = load_model(Path(path), where=where)
        row = generation_roofline(model, tokenizer, args.eval_limit, peak)
        print(
            f"{label:<10} {row['items']:>4} prompts {row['seconds']:>7.1f} s {row['tps']:>7.1f} tok/s "
            f"{row['gflops']:>6.1f} GFLOP/s  ratio {row['ratio']:.2f}"
        )
        del model
    if args.reaudit_only:
        return 0
    print("\n== harness per slice (base and quantized, same process) ==")
    print(f"{'model':<10} {'slice':<18} {'items':>5} {'seconds':>8} {'tok/s':>8} {'bare fwd tok/s':>15} {'ratio':>6}")
    for label, path in (("base", base["path"]), ("quantized", artifact["path"])):
        model, tokenizer = load_model(Path(path), where=where)
        for row in bench_slices(model, tokenizer, args.eval_limit):
            ratio = f"{row['ratio']:.2f}" if row["ratio"] else "n/a"
            bare = f"{row['bare']:.1f}" if row["bare"] else "n/a"
            print(
                f"{label:<10} {row['slice']:<18} {row['items']:>5} {row['seconds']:>8.1f} {row['tps']:>8.1f} "
                f"{bare:>15} {ratio:>6}"
            )
    print("\n== serving overhead: logged requests vs the bare generate call (same artifact) ==")
    print(serving_overhead(tracker, work / "store", artifact, where))
    return 0  # a failing gate is a finding of the audit, not a failure of the benchmark


if __name__ == "__main__":
    raise SystemExit(main())
