"""The MLflow pyfunc a registered version loads as: `mlflow models serve -m models:/<name>@production`."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

from quant_pipeline.core.paths import default_mlflow_uri, default_store_dir
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.serving.config import load_serving_config
from quant_pipeline.serving.server import Server


def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class QuantizedLLM(mlflow.pyfunc.PythonModel):
    """A registered version: a reference to verified bytes on disk, served with per-request logging.

    Inputs: a list of prompts, a dict (one request, or columns), or a DataFrame with a `prompt`
    column and optional `critical`, `request_id`, `max_new_tokens`, `seed`. Outputs: one row per
    request with `request_id`, `output`, `artifact_id`, `served_by` (and the route and version).
    Environment: QP_STORE_DIR (where the request log goes; default the store the artifact lies in),
    QP_SERVE_REF (follow an alias such as `production` per request instead of this version),
    QP_SERVE_LOG_PROMPTS=0 (log prompt hashes only), QP_SERVE_CRITICAL_RULES (JSON list of regexes),
    QP_SERVE_CONFIG (a serving config YAML: canary share or shadow, budgets, concurrency; serving/config.py).
    Only an approved version (or the kept base) loads, exactly as `quant-pipeline serve` enforces it;
    QP_SERVE_ALLOW_UNAPPROVED=1 is for testing and is written into every request it serves."""

    def load_context(self, context) -> None:
        ref = json.loads(Path(context.artifacts["artifact_ref"]).read_text())
        if ref.get("bundled") in context.artifacts and not Path(ref["model_dir"]).is_dir():
            ref["model_dir"] = context.artifacts[ref["bundled"]]  # audited elsewhere: the copy MLflow fetched
        config = dict(getattr(context, "model_config", None) or {})
        store = (
            os.environ.get("QP_STORE_DIR")
            or config.get("store_dir")
            or ref.get("store_dir")
            or str(default_store_dir())
        )
        rules = (
            json.loads(os.environ["QP_SERVE_CRITICAL_RULES"])
            if os.environ.get("QP_SERVE_CRITICAL_RULES")
            else config.get("critical_rules", [])
        )
        log_prompts = os.environ.get("QP_SERVE_LOG_PROMPTS", str(config.get("log_prompts", True))).lower() not in (
            "0",
            "false",
            "no",
        )
        tracker = MlflowTracker(tracking_uri=os.environ.get("QP_MLFLOW_TRACKING_URI") or default_mlflow_uri())
        config_file = os.environ.get("QP_SERVE_CONFIG") or config.get("serving_config")
        serving = load_serving_config(config_file) if config_file else None
        self.server = Server(
            tracker,
            ref["model_name"],
            ref=os.environ.get("QP_SERVE_REF") or config.get("ref") or ref["artifact_id"],
            store_dir=Path(store),
            log_prompts=log_prompts,
            critical_rules=rules,
            known_refs=[ref],
            allow_unapproved=os.environ.get("QP_SERVE_ALLOW_UNAPPROVED", "0").lower() in ("1", "true", "yes"),
            config=serving,
        )  # fmt: skip  -- Server re-hashes every file against the reference before loading, or raises

    # Annotated as a DataFrame (what the scoring server passes) so MLflow infers no schema from the
    # hint: lists and dicts are accepted too.
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None):
        params = dict(params or {})
        as_frame = isinstance(model_input, pd.DataFrame)
        if as_frame:
            rows = model_input.to_dict("records")
        elif isinstance(model_input, str):
            rows = [{"prompt": model_input}]
        elif isinstance(model_input, dict):
            rows = (
                pd.DataFrame(model_input).to_dict("records")
                if isinstance(model_input.get("prompt"), list)
                else [model_input]
            )
        else:
            rows = [r if isinstance(r, dict) else {"prompt": r} for r in list(model_input)]
        out = []
        for row in rows:
            get = lambda key, default=None, row=row: default if _is_missing(row.get(key)) else row[key]  # noqa: E731
            rec = self.server.generate(
                str(get("prompt", "")),
                max_new_tokens=int(get("max_new_tokens", params.get("max_new_tokens", 64))),
                seed=int(get("seed", params.get("seed", 0))),
                critical=str(get("critical", False)).lower() in ("true", "1", "yes"),
                request_id=str(get("request_id")) if get("request_id") is not None else None,
            )  # fmt: skip
            out.append(
                {
                    k: rec[k]
                    for k in ("request_id", "output", "artifact_id", "served_by", "model_version", "route_reason")
                }
            )
        return pd.DataFrame(out) if as_frame else out
