"""`quant-pipeline`: the headless entry point (what `make demo` runs).

Exit codes of `audit`: 0 the audit completed with verdict PASS; 3 the audit completed with verdict
FAIL or INCOMPLETE (the report says which slices, and why); 2 bad input (the one-line
message on stderr names the file, field or setting and the fix); 1 a stage crashed (one line on
stderr names it and the Dagster run that holds the traceback). Other verbs: 0 done, 2 bad input.
"""

from __future__ import annotations

import argparse
import os
import sys

from quant_pipeline.cli.registry import add_registry_commands
from quant_pipeline.cli.serve import add_serving_commands
from quant_pipeline.core.errors import EXIT_BAD_INPUT, AuditInputError

__all__ = ["main"]


def _quiet_before_imports() -> None:
    """Library chatter that is decided at import time, kept off the terminal (`--verbose` keeps it): tqdm
    reads its defaults from the environment when imported (lm-eval's per-task bars, MLflow's download
    bars: ours set `disable` themselves and stay), torchao logs its missing
    CUDA extensions and torch its pytree deprecations as they load, Dagster warns at import that partitioned
    asset checks are a preview feature (the checks are tested here)."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore", message="Specifying a partitions_def on an AssetCheckSpec")

    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _unreachable_tracking(error: Exception) -> str | None:
    """The one line for a tracking server that does not answer (None: another error, which is a bug to show whole).
    MLflow raises it as a generic MlflowException whose message names the request: matched by name, so that
    `--help` and the store-only verbs never import MLflow to catch it."""
    text = str(error)
    if type(error).__name__ != "MlflowException" or not text.startswith("API request to "):
        return None
    server = text.removeprefix("API request to ").split("/api/", 1)[0]
    reason = "connection refused" if "Connection refused" in text else text.rsplit("(Caused by ", 1)[-1][:160]
    return (
        f"cannot reach the MLflow tracking server at {server} ({reason}): start it, or point "
        "QP_MLFLOW_TRACKING_URI at the server the pipeline records to"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quant-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="run the full audit (base checkpoint -> approval)")
    audit.add_argument(
        "--model", help="'default' (SmolLM2), 'gemma3-270m', a local HF checkpoint dir, a .gguf file or a hub id"
    )
    audit.add_argument(
        "--model-name", help="the registered model it is audited as (default: the checkpoint's own name)"
    )
    audit.add_argument(
        "--new-base-version", action="store_true", default=None, help="register another architecture under the name"
    )
    audit.add_argument("--calibration-file")
    audit.add_argument("--policy-file")
    audit.add_argument(
        "--method",
        help="gptq (default), torchao-int8-weight, torchao-int8-dynamic, torchao-int4-weight, bnb-int8, bnb-nf4, "
        "hqq (with --bits, --group-size), identity",
    )
    audit.add_argument(
        "--candidates",
        help="audit several candidates, then compare them: comma-separated keys (gptq-w4-g64,torchao-int8-weight,"
        "identity, ...) or `all`",
    )
    audit.add_argument(
        "--search",
        type=int,
        default=0,
        help="with --candidates: when no quantized candidate passes, up to N more candidates of the one nearest to "
        "passing, each keeping one more of its most sensitive layer types at full precision, until one passes",
    )
    audit.add_argument("--calibration-samples", type=int)
    audit.add_argument("--group-size", type=int)
    audit.add_argument("--bits", type=int)
    audit.add_argument("--eval-limit", type=int, help="items per eval task (for quick runs)")
    audit.add_argument("--eval-max-new-tokens", type=int, help="cap on tokens generated per answer (quick runs)")
    audit.add_argument("--approver", default="", help="name of the human signing off (omit: pending sign-off)")
    audit.add_argument("--note", default="")
    audit.add_argument("--verbose", action="store_true", help="Dagster DEBUG events and library warnings too")
    add_registry_commands(sub)
    add_serving_commands(sub)
    args = parser.parse_args(argv)
    # MLflow draws a progress bar per download (a pull or a first serve downloads dozens): the verbs say what they got
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if hasattr(args, "func"):
        # a verb a person waits on: MLflow's 7 retries with backoff would take 4 min to say the server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        try:
            return args.func(args)
        except AuditInputError as e:
            print(f"quant-pipeline: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        except Exception as e:
            unreachable = _unreachable_tracking(e)
            if unreachable is None:
                raise
            print(f"quant-pipeline: error: {unreachable}", file=sys.stderr)
            return EXIT_BAD_INPUT

    if args.command == "audit":  # dagster, the asset graph and torch load only now (seconds)
        if not args.verbose:
            _quiet_before_imports()
        from quant_pipeline.cli.audit import audit_outcome, run_audit, summarize
        from quant_pipeline.core.recipe import Recipe
        from quant_pipeline.defs.resources import AuditSettings

        overrides: dict = {
            k: v
            for k, v in {
                "model": args.model,
                "model_name": args.model_name,
                "new_base_version": args.new_base_version,
                "calibration_file": args.calibration_file,
                "policy_file": args.policy_file,
                "eval_limit": args.eval_limit,
                "eval_max_new_tokens": args.eval_max_new_tokens,
            }.items()
            if v is not None
        }
        recipe = {
            k: v
            for k, v in {
                "method": args.method,
                "calibration_samples": args.calibration_samples,
                "group_size": args.group_size,
                "bits": args.bits,
            }.items()
            if v is not None
        }
        if recipe:
            overrides["recipe"] = Recipe(**{**AuditSettings.from_env().recipe.model_dump(), **recipe})
        if args.candidates is not None:
            if recipe or args.approver:
                parser.error("--candidates names each recipe itself, and a recommendation is signed off afterwards "
                             "(`quant-pipeline approve`): drop --method/--bits/--group-size/--approver")  # fmt: skip
            from quant_pipeline.cli.candidates import audit_candidates, parse_candidates

            try:
                keys = parse_candidates(args.candidates)
                return audit_candidates(overrides, keys, verbose=args.verbose, search=args.search)
            except AuditInputError as e:
                print(f"quant-pipeline: error: {e}", file=sys.stderr)
                return EXIT_BAD_INPUT
        try:
            result = run_audit(overrides, args.approver, args.note, verbose=args.verbose)
        except AuditInputError as e:
            print(f"quant-pipeline: error: {e}", file=sys.stderr)
            return EXIT_BAD_INPUT
        outcome = audit_outcome(result)
        print(summarize(result))
        print(f"\nDagster runs {', '.join(result.run_ids)}: `make ui` then http://127.0.0.1:3000/runs/{result.run_id}")
        print("MLflow runs and registry: `make mlflow` then http://127.0.0.1:5000\n")
        print(outcome.verdict, flush=True)  # last: the verdict and where the report is
        if outcome.error:
            print(f"quant-pipeline: error: {outcome.error}", file=sys.stderr)
        return outcome.code
    return 2


if __name__ == "__main__":
    sys.exit(main())
