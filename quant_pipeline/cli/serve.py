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
    if given:
        return given
    return settings.source().name


def serve_command(args) -> int:
    from quant_pipeline.core.errors import AuditInputError

    if args.http and (args.prompt or args.critical):
        raise AuditInputError("--http takes its prompts (and `critical`) from requests: drop --prompt/--critical")
    config = None  # the defaults: production only, one request generating at a time
    if args.config:  # refused (exit 2) before any model or registry work
        from quant_pipeline.serving.config import load_serving_config

        config = load_serving_config(args.config)
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
        config=config,
    )
    if args.http:
        return _serve_http(server, args.host, args.port)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt in prompts:
        budget = args.max_new_tokens if args.max_new_tokens is not None else min(64, server.config.max_new_tokens)
        rec = server.generate(prompt, max_new_tokens=budget, seed=args.seed, critical=args.critical)
        keys = (
            "request_id",
            "model_version",
            "artifact_id",
            "served_by",
            "arm",
            "route_reason",
            "alias_changed",
            "latency_s",
            "output",
        )
        print(json.dumps({k: rec.get(k) for k in keys}, ensure_ascii=False))
    return 0


def _serve_http(server, host: str, port: int) -> int:
    """Serve until SIGINT or SIGTERM, then drain: requests admitted or queued finish and are logged."""
    import signal
    import threading

    from quant_pipeline.serving.http import HttpFrontend

    front = HttpFrontend(server, host, port)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        front.start()
        state = server.state()
        canary = f", canary v{state['canary']['model_version']}" if state["canary"] else ""
        print(
            f"quant-pipeline: serving {server.model_name} at {front.url} "
            f"(production v{state['production']['model_version']}{canary}, mode {server.config.mode}, "
            f"canary_share {server.config.canary_share}); POST /v1/generate, GET /healthz, GET /v1/stats",
            flush=True,
        )
        while not stop.wait(0.5):
            pass
    finally:
        front.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"quant-pipeline: drained and stopped: {json.dumps(server.stats())}", flush=True)
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
    serve.add_argument("--max-new-tokens", type=int, help="per prompt (default 64, or the config's budget if lower)")
    serve.add_argument("--seed", type=int, default=0)
    serve.add_argument(
        "--config",
        help="serving config YAML: canary share or shadow mode, token budgets, concurrency, queue, timeout "
        "(every field: quant_pipeline/serving/serving.example.yaml)",
    )
    serve.add_argument(
        "--http",
        action="store_true",
        help="serve over HTTP (POST /v1/generate, GET /healthz, GET /v1/stats) until SIGINT/SIGTERM, then drain",
    )
    serve.add_argument("--host", default="127.0.0.1", help="with --http: address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8080, help="with --http: port (0: any free port; default 8080)")
    serve.set_defaults(func=serve_command)
    rep = subparsers.add_parser(
        "reproduce", help="re-run a logged request on its exact artifact and compare outputs token by token"
    )
    rep.add_argument("request_id")
    rep.add_argument("--model-name", help="registered model (default: the configured model's name)")
    rep.set_defaults(func=reproduce_command)
