"""`serve` and `reproduce`: answer prompts from a registered model; re-run a logged request exactly."""

from __future__ import annotations

import json
import sys

# Heavy imports (dagster, MLflow, torch) happen inside the commands: `--help` and usage errors stay instant.


def _resources():
    from quant_pipeline.defs.resources import build_resources

    resources = build_resources()
    return resources["settings"], resources["mlflow"]


def _model_name(settings, given: str | None) -> str:
    from quant_pipeline.models.checkpoint import resolve_model_source

    if given:
        return given
    return resolve_model_source(settings.model).name


def serve_command(args) -> int:
    from quant_pipeline.serving import Server

    settings, tracker = _resources()
    server = Server(
        tracker,
        _model_name(settings, args.model_name),
        args.ref,
        settings.store,
        log_prompts=not args.no_log_prompts,
        critical_rules=args.critical_rule,
        allow_unapproved=args.allow_unapproved,
    )
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt in prompts:
        rec = server.generate(prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, critical=args.critical)
        keys = (
            "request_id",
            "model_version",
            "artifact_id",
            "served_by",
            "route_reason",
            "alias_changed",
            "latency_s",
            "output",
        )
        print(json.dumps({k: rec.get(k) for k in keys}, ensure_ascii=False))
    return 0


def reproduce_command(args) -> int:
    from quant_pipeline.serving import reproduce

    settings, tracker = _resources()
    result = reproduce(tracker, settings.store, _model_name(settings, args.model_name), args.request_id)
    line = f"{args.request_id}: {result['status']} on {result['artifact_id']}"
    if "first_divergent_token" in result:
        line += (
            f" (first divergent token {result['first_divergent_token']}: "
            f"logged {result['logged_output']!r}, now {result['output']!r})"
        )
    print(line)
    for warning in result["runtime_warnings"]:
        print(f"  runtime changed since the request: {warning}")
    return 0 if result["status"] == "reproduced exactly" else 1


def add_serving_commands(subparsers) -> None:
    """`serve` and `reproduce` subcommands (each sets `func`, returning an exit code)."""
    serve = subparsers.add_parser(
        "serve", help="answer prompts from a registered model, logging each request's provenance"
    )
    serve.add_argument("--model-name", help="registered model (default: the configured model's name)")
    serve.add_argument(
        "--ref", default="production", help="artifact ID, alias (approved, production) or `base` (default: production)"
    )
    serve.add_argument("--prompt", action="append", help="a prompt (repeatable); without it, one prompt per stdin line")
    serve.add_argument("--critical", action="store_true", help="serve with the full-precision base model")
    serve.add_argument(
        "--critical-rule",
        action="append",
        default=[],
        help="regex; matching prompts are served by the base model (repeatable)",
    )
    serve.add_argument(
        "--no-log-prompts",
        action="store_true",
        help="log each prompt's sha256 instead of its text (such requests cannot be reproduced)",
    )
    serve.add_argument(
        "--allow-unapproved",
        action="store_true",
        help="serve a version without a recorded approval (testing only; written into every request's log entry)",
    )
    serve.add_argument("--max-new-tokens", type=int, default=64)
    serve.add_argument("--seed", type=int, default=0)
    serve.set_defaults(func=serve_command)
    rep = subparsers.add_parser(
        "reproduce", help="re-run a logged request on its exact artifact and compare outputs token by token"
    )
    rep.add_argument("request_id")
    rep.add_argument("--model-name", help="registered model (default: the configured model's name)")
    rep.set_defaults(func=reproduce_command)
