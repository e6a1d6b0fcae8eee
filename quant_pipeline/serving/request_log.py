"""The request log: one JSON line per served request (authoritative) and one MLflow trace (the view).

A served answer is only auditable if one can say, for that one request, which exact bytes produced
it and how. So every request gets a record: which registry version and artifact (content hash,
base hash, recipe, calibration hash), the runtime fingerprint it ran on, the greedy decoding
parameters, the prompt (or only its sha256), the output and its token ids, the latency, and why
it was routed where it went (arm, canary bucket, fallback, shadow comparison); findable in MLflow by
its `request_id` tag. Requests that were not answered (busy, over budget, timed out) get a line too,
with their status, so the log accounts for all traffic.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import mlflow
from mlflow.entities import SpanType
from mlflow.entities.span import NO_OP_SPAN_TRACE_ID

from quant_pipeline.core.records import RequestLogEntry
from quant_pipeline.core.store import ArtifactStore, append_line_locked, read_json_lines
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.release.reference import ServingError

# Provenance fields copied into trace tags (searchable); the full record is a root-span attribute.
TRACE_TAG_FIELDS = (
    "request_id", "status", "model_name", "model_version", "artifact_id", "served_by", "arm", "route_reason",
    "alias_changed", "canary_changed", "content_hash", "base_hash", "quant_method", "bits", "group_size",
    "calibration_hash", "runtime_hash", "prompt_sha256",
)  # fmt: skip


_TRACE_LOCK = threading.Lock()


def requests_path(store: ArtifactStore | Path, model_name: str) -> Path:
    return ArtifactStore.of(store).requests_path(model_name)


def append_request(path: Path, record: dict) -> None:
    """One line per request under the store's locked append (threads and server workers alike).

    A line torn by a crash is closed off rather than refused: serving must go on, and readers skip it."""
    line = json.dumps(record, sort_keys=True, default=str)  # ASCII: no raw U+2028 inside a line
    append_line_locked(path, lambda _last: line, repair_torn=True)


def read_requests(store_dir: ArtifactStore | Path, model_name: str) -> list[dict]:
    """Every logged request, each validated as a `RequestLogEntry` (a torn line is skipped)."""
    path = requests_path(store_dir, model_name)
    lines = read_json_lines(path, skip_torn=True)  # a line cut by a crash mid-write; every other stands alone
    for number, obj in lines:
        RequestLogEntry.parse_line(obj, f"{path} line {number}")
    return [obj for _, obj in lines]


def find_request(store_dir: Path, model_name: str, request_id: str) -> dict:
    """The logged record of one request (from the JSONL, the authoritative log)."""
    found = [r for r in read_requests(store_dir, model_name) if r.get("request_id") == request_id]
    if not found:
        raise ServingError(
            f"no request {request_id} in {requests_path(store_dir, model_name)}: check the ID and --model-name"
        )
    return found[-1]


def _point_tracing_at(tracking_uri: str) -> None:
    """MLflow's tracer exports to the process-global tracking URI: set it (caller holds _TRACE_LOCK),
    without leaking MLFLOW_TRACKING_URI into the environment of subprocesses started later."""
    if mlflow.get_tracking_uri() == tracking_uri:
        return
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def log_trace(tracking_uri: str, experiment_id: str, record: dict, start_ns: int, end_ns: int) -> str | None:
    """One MLflow trace for one request: inputs, outputs, provenance as tags and attributes.
    Best effort (the JSONL is authoritative): returns the trace ID, or None if tracing failed."""
    tags = {k: str(record[k]) for k in TRACE_TAG_FIELDS if record.get(k) is not None}
    inputs = {"prompt": record.get("prompt"), "prompt_sha256": record["prompt_sha256"], **record["decoding"]}
    outputs = {"output": record.get("output"), "output_ids": record.get("output_ids"), "error": record.get("error")}
    provenance = {k: v for k, v in record.items() if k not in ("prompt", "output", "output_ids")}
    with _TRACE_LOCK:
        _point_tracing_at(tracking_uri)
        span = mlflow.start_span_no_context(
            "generate", span_type=SpanType.LLM, inputs=inputs, attributes={"quant_pipeline.provenance": provenance},
            tags=tags, experiment_id=experiment_id, start_time_ns=start_ns,
        )  # fmt: skip
        span.end(outputs=outputs, status="OK" if record.get("status") == "ok" else "ERROR", end_time_ns=end_ns)
    return None if span.trace_id == NO_OP_SPAN_TRACE_ID else span.trace_id


def find_trace(tracker: MlflowTracker, model_name: str, request_id: str):
    """The MLflow trace of one request (searched by its `request_id` tag), or None."""
    client = tracker.client()
    exp = client.get_experiment_by_name(f"quant_pipeline/{model_name}")
    if exp is None:
        return None
    rid = request_id.replace("'", "")
    found = client.search_traces(
        locations=[exp.experiment_id], filter_string=f"tag.request_id = '{rid}'", max_results=2, flush=True
    )
    return found[0] if found else None
