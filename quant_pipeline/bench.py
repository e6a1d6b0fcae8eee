"""`make bench`: the default audit, measured. A command, not a timed test (machines are shared and noisy).

Prints per stage wall seconds and peak memory, the eval stage's tokens/s next to a bare forward
pass over the same tokens in the same process (their ratio is the harness overhead), and the
artifact's size against the base checkpoint's.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def bare_forward_tokens_per_second(model, tokenizer, texts: list[str], batch_size: int = 8) -> tuple[float, int]:
    """Forward passes only (no harness) over the given texts, batched like the harness does."""
    import torch

    encoded = sorted((tokenizer(t)["input_ids"] for t in texts), key=len, reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(encoded), batch_size):
            batch = encoded[i : i + batch_size]
            width = len(batch[0])
            ids = torch.tensor([seq + [pad] * (width - len(seq)) for seq in batch])
            mask = torch.tensor([[1] * len(seq) + [0] * (width - len(seq)) for seq in batch])
            model(input_ids=ids, attention_mask=mask)
            tokens += sum(len(seq) for seq in batch)
    seconds = time.perf_counter() - t0
    return tokens / seconds, tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quant_pipeline.bench")
    parser.add_argument("--eval-limit", type=int, default=None, help="items per eval task")
    parser.add_argument("--calibration-samples", type=int, default=None)
    args = parser.parse_args(argv)

    import dagster as dg

    from quant_pipeline.cli import run_audit, summarize
    from quant_pipeline.eval_results import load_model, run_suite
    from quant_pipeline.settings import AuditSettings, Recipe
    from quant_pipeline.tracking import MlflowTracker

    import shutil

    from quant_pipeline.sensors import CALIBRATION_STAGES
    from quant_pipeline.settings import DEFAULT_CALIBRATION, DEFAULT_POLICY

    work = Path(tempfile.mkdtemp(prefix="qp-bench-"))
    calibration = Path(shutil.copy(DEFAULT_CALIBRATION, work / "calibration.jsonl"))
    policy = Path(shutil.copy(DEFAULT_POLICY, work / "policy.yaml"))
    overrides: dict = {"store_dir": str(work / "store"), "eval_limit": args.eval_limit, "calibration_file": str(calibration), "policy_file": str(policy)}
    if args.calibration_samples:
        overrides["recipe"] = Recipe(**{**AuditSettings.from_env().recipe.model_dump(), "calibration_samples": args.calibration_samples})
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
        timed("re-audit after calibration change", CALIBRATION_STAGES)
        policy.write_text(policy.read_text().replace("name: ", "name: changed-", 1))
        timed("re-audit after policy change", ["delta_report", "approval"])
    print("\n== incremental re-audit (same run) ==")
    cold = timings["cold full audit"]
    for name, seconds in timings.items():
        print(f"{name:<36} {seconds:>8.1f} s  {seconds / cold:>6.3f} of cold")

    base = result.output_for_node("base_checkpoint")
    artifact = result.output_for_node("quantized_artifact")
    print("\n== size ==")
    print(f"base {base['size_bytes'] / 2**20:.1f} MB, artifact {artifact['size_bytes'] / 2**20:.1f} MB, ratio {artifact['size_bytes'] / base['size_bytes']:.3f}")

    print("\n== eval throughput vs bare forward (same tokens, same process) ==")
    print(f"{'model':<10} {'eval tok/s':>11} {'forward tok/s':>14} {'ratio':>6} {'tokens':>8}")
    for label, path in (("base", base["path"]), ("quantized", artifact["path"])):
        model, tokenizer = load_model(Path(path))
        _, _, stats = run_suite(model, tokenizer, label, args.eval_limit)
        forward_tps, tokens = bare_forward_tokens_per_second(model, tokenizer, stats["request_texts"])
        print(f"{label:<10} {stats['eval_tokens_per_second']:>11.1f} {forward_tps:>14.1f} {stats['eval_tokens_per_second'] / forward_tps:>6.2f} {tokens:>8}")
    return 0 if result.success else 1


if __name__ == "__main__":
    raise SystemExit(main())
