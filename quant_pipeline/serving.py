"""Serving registered models with per-request provenance, and reproducing any logged request exactly.

A served answer is only auditable if one can say, for that one request, which exact bytes produced
it and how. So every request gets a record: which registry version and artifact (content hash,
base hash, recipe, calibration hash), the runtime fingerprint it ran on, the greedy decoding
parameters, the prompt (or only its sha256), the output and its token ids, the latency, and why
it was routed where it went. The record goes to an append-only JSONL file per model (the
authoritative log) and to an MLflow trace in the model's experiment, findable by `request_id`.

What gets served is resolved through the MLflow registry: an artifact ID, an alias (`approved`,
`production`) or `base`. The registered version is a small MLflow pyfunc whose only artifact is a
reference to the artifact directory and its per-file hashes (never the weights); every load re-hashes
the directory against that reference and refuses to load bytes that differ, naming each file.
An alias is looked up again before every request, so moving `production` back (a rollback) takes
effect on the next request without a restart. Requests flagged critical, or matching a critical
rule, are served by the full-precision base model.

`reproduce` re-runs a logged request on the exact logged artifact with the logged decoding and
compares token ids, naming what changed in the runtime since.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quant_pipeline.behaviour import first_divergence
from quant_pipeline.errors import AuditInputError
from quant_pipeline.storage import RECORD_FILE, diff_hashes, file_hashes, tree_hash
from quant_pipeline.tracking import MlflowTracker

REF_FILE = "artifact_ref.json"
REF_SCHEMA = "quant_pipeline.artifact_ref/1"
PYFUNC_ARTIFACT_PATH = "model"
BASE_REF = "base"
# Provenance fields copied into trace tags (searchable); the full record is a root-span attribute.
TRACE_TAG_FIELDS = (
    "request_id", "model_name", "model_version", "artifact_id", "served_by", "route_reason", "alias_changed",
    "content_hash", "base_hash", "quant_method", "bits", "group_size", "calibration_hash", "runtime_hash", "prompt_sha256",
)  # fmt: skip


class ServingError(AuditInputError):
    """A model that must not be served, or a request that cannot be reproduced (the message says why)."""


# -- the reference a registered pyfunc carries ------------------------------------------------
def build_ref(model_dir: Path, record: dict, store_dir: Path | None = None) -> dict:
    """The small JSON a registered version carries instead of the weights: where the checkpoint
    lies, its per-file hashes, and the provenance of those bytes.

    `record` is a quantized artifact's record (`content_hash`, `recipe`, ...) or a base
    checkpoint's record (`hash` instead of `content_hash`, no recipe)."""
    from quant_pipeline.base_checkpoint import base_artifact_id

    model_dir = Path(model_dir).resolve()
    files = record.get("files") or file_hashes(model_dir)
    content_hash = record.get("content_hash") or record.get("hash") or tree_hash(files)
    if tree_hash(files) != content_hash:
        raise ServingError(f"record for {model_dir} is inconsistent: its per-file hashes do not add up to its content hash {content_hash[:12]}")
    kind = record.get("kind") or ("quantized" if record.get("recipe") else "base")
    if store_dir is None and model_dir.parent.name == "artifacts":
        store_dir = model_dir.parent.parent
    return {
        "schema": REF_SCHEMA,
        "artifact_id": record.get("artifact_id") or base_artifact_id(content_hash),
        "kind": kind,
        "model_name": record.get("model_name") or (record.get("source") or {}).get("name") or model_dir.name,
        "model_dir": str(model_dir),
        "content_hash": content_hash,
        "files": dict(sorted(files.items())),
        "base_hash": record.get("base_hash") or (content_hash if kind == "base" else None),
        "base_path": record.get("base_path"),
        "recipe": record.get("recipe"),
        "calibration_hash": record.get("calibration_hash"),
        "runtime_hash": record.get("runtime_hash"),
        "runtime": record.get("runtime"),
        "precision": record.get("precision") or (f"{record['dtype']} (full precision)" if record.get("dtype") else None),
        "store_dir": str(Path(store_dir).resolve()) if store_dir else None,
    }


def verify_ref(ref: dict) -> None:
    """Re-hash the checkpoint directory against the reference; raise naming every differing file."""
    directory = Path(ref["model_dir"])
    if tree_hash(ref["files"]) != ref["content_hash"]:
        raise ServingError(f"reference of {ref['artifact_id']} is inconsistent: its file hashes do not add up to content hash {ref['content_hash'][:12]}")
    if not directory.is_dir():
        raise ServingError(f"refusing to load {ref['artifact_id']}: its directory {directory} is missing")
    problems = diff_hashes(ref["files"], file_hashes(directory))
    if problems:
        raise ServingError(f"refusing to load {ref['artifact_id']} from {directory}: files differ from the registered hashes: {'; '.join(problems)}")


def log_registered_pyfunc(
    client: MlflowClient, run_id: str, model_dir: Path, record: dict, store_dir: Path | None = None, artifact_path: str = PYFUNC_ARTIFACT_PATH
) -> str:
    """Log a `QuantizedLLM` pyfunc (reference only, no weights) under the run; return the source URI
    to register (`<run artifact_uri>/model`). The directory must match the record right now.
    One pyfunc per run and artifact path: a second one would silently merge into the first."""
    ref = build_ref(model_dir, record, store_dir)
    verify_ref(ref)
    if client.list_artifacts(run_id, artifact_path):
        raise ServingError(f"run {run_id} already holds a model at `{artifact_path}`: log each registered version from its own run or artifact_path")
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / REF_FILE
        ref_path.write_text(json.dumps(ref, indent=2, sort_keys=True))
        saved = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(saved),
            python_model=QuantizedLLM(),
            artifacts={"artifact_ref": str(ref_path)},
            code_paths=None,
            pip_requirements=[],  # served with --env-manager local: no pip inference (it would load the model)
            metadata={"quant_pipeline_artifact_id": ref["artifact_id"], "quant_pipeline_kind": ref["kind"], "content_hash": ref["content_hash"]},
        )
        client.log_artifacts(run_id, str(saved), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"


# -- generation ---------------------------------------------------------------------------------
def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> dict:
    """One prompt, greedy: the audit's own `generate_greedy` with batch size 1 (no padding), so a
    served output and its reproduction take exactly the path the evaluation took."""
    import torch

    from quant_pipeline.generation import generate_greedy

    torch.manual_seed(seed)
    return generate_greedy(model, tokenizer, [prompt], [max_new_tokens], batch_size=1)[0]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the request log ----------------------------------------------------------------------------
_FILE_LOCKS: dict[str, threading.Lock] = {}
_FILE_LOCKS_GUARD = threading.Lock()
_TRACE_LOCK = threading.Lock()


def requests_path(store_dir: Path, model_name: str) -> Path:
    return Path(store_dir) / "requests" / f"{model_name}.jsonl"


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line: a thread lock within the process, flock across processes (server workers)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, sort_keys=True, default=str) + "\n"  # ASCII: no raw U+2028 inside a line
    with _FILE_LOCKS_GUARD:
        lock = _FILE_LOCKS.setdefault(str(path.resolve()), threading.Lock())
    with lock, open(path, "a", encoding="utf-8") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def read_requests(store_dir: Path, model_name: str) -> list[dict]:
    path = requests_path(store_dir, model_name)
    if not path.exists():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash mid-write; every other line stands alone
    return out


def find_request(store_dir: Path, model_name: str, request_id: str) -> dict:
    """The logged record of one request (from the JSONL, the authoritative log)."""
    found = [r for r in read_requests(store_dir, model_name) if r.get("request_id") == request_id]
    if not found:
        raise ServingError(f"no request {request_id} in {requests_path(store_dir, model_name)}: check the ID and --model-name")
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
    from mlflow.entities import SpanType
    from mlflow.entities.span import NO_OP_SPAN_TRACE_ID

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
    found = client.search_traces(locations=[exp.experiment_id], filter_string=f"tag.request_id = '{rid}'", max_results=2, flush=True)
    return found[0] if found else None


# -- resolving a ref to verified bytes ---------------------------------------------------------
@dataclass(frozen=True)
class Resolved:
    version: str | None
    ref: dict

    @property
    def artifact_id(self) -> str:
        return self.ref["artifact_id"]

    @property
    def kind(self) -> str:
        return self.ref["kind"]


class ModelResolver:
    """Registry version (or artifact ID, or alias) -> the version's reference, cross-checked."""

    def __init__(self, tracker: MlflowTracker, model_name: str, store_dir: Path, known_refs: list[dict] = ()):
        self.tracker, self.model_name, self.store = tracker, model_name, Path(store_dir)
        self.client = tracker.client()
        self.known = {r["artifact_id"]: r for r in known_refs}

    def alias_version(self, alias: str):
        return self.tracker.alias_model_version(self.model_name, alias)

    def version_of(self, artifact_id: str):
        return self.tracker.model_version(self.model_name, artifact_id)

    def base_version(self, base_hash: str | None):
        return self.tracker.base_model_version(self.model_name, base_hash)

    def resolve(self, ref: str) -> tuple[Resolved, str | None]:
        """(what `ref` names now, the alias followed or None)."""
        if ref == BASE_REF:
            mv = self.base_version(None)
            if mv is None:
                known = [r for r in self.known.values() if r["kind"] == "base"]
                if known:
                    return Resolved(None, known[0]), None
                raise ServingError(f"{self.model_name} has no registered base version (tag kind=base) to serve")
            return self.for_version(mv), None
        mv = self.version_of(ref)
        if mv is not None:
            return self.for_version(mv), None
        if ref in self.known or (self.store / "artifacts" / ref / RECORD_FILE).exists():
            return Resolved(None, self.ref_for_artifact(ref)), None
        mv = self.alias_version(ref)
        if mv is not None:
            return self.for_version(mv), ref
        if re.fullmatch(r"v?\d+", ref):  # a registry version number, pinned
            try:
                return self.for_version(self.client.get_model_version(self.model_name, ref.lstrip("v"))), None
            except MlflowException:
                pass
        raise ServingError(f"{self.model_name}: `{ref}` is neither a registered artifact ID, an alias (approved, production), a version number nor `base`")

    def ref_for_artifact(self, artifact_id: str) -> dict:
        """An artifact's reference: via its registry version, else from its record in the store."""
        mv = self.version_of(artifact_id)
        if mv is not None:
            return self.for_version(mv).ref
        if artifact_id in self.known:
            return self.known[artifact_id]
        directory = self.store / "artifacts" / artifact_id
        if (directory / RECORD_FILE).exists():
            return build_ref(directory, json.loads((directory / RECORD_FILE).read_text()), self.store)
        raise ServingError(f"artifact {artifact_id} is neither registered for {self.model_name} nor in {self.store / 'artifacts'}")

    def for_version(self, mv) -> Resolved:
        """The reference a version carries (its pyfunc's artifact_ref.json; for a version registered
        with a plain directory source, the directory's record), checked against the version's tags."""
        tags = dict(mv.tags)
        aid = tags.get("artifact_id")
        ref = self.known.get(aid) or self._download_ref(mv.source) or self._ref_from_directory(mv, tags)
        for key in ("artifact_id", "content_hash"):
            if tags.get(key) and tags[key] != ref[key]:
                raise ServingError(f"{self.model_name} v{mv.version}: registry tag {key}={tags[key][:16]} but its reference says {ref[key][:16]}: refusing to serve")
        return Resolved(str(mv.version), ref)

    def _download_ref(self, source: str) -> dict | None:
        parsed = urlparse(source)
        if parsed.scheme == "file":  # a local artifact store: read in place
            path = Path(unquote(parsed.path)) / "artifacts" / REF_FILE
            return json.loads(path.read_text()) if path.is_file() else None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=f"{source.rstrip('/')}/artifacts/{REF_FILE}", dst_path=tmp, tracking_uri=self.tracker.tracking_uri)
            except Exception:  # not a quant_pipeline pyfunc (a plain checkpoint directory was registered)
                return None
            return json.loads(Path(local).read_text())

    def _ref_from_directory(self, mv, tags: dict) -> dict:
        parsed = urlparse(mv.source)
        directory = Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else None
        if directory is None or not directory.is_dir():
            raise ServingError(f"{self.model_name} v{mv.version}: source {mv.source} is neither a quant_pipeline pyfunc nor a local checkpoint directory")
        record_path = directory / RECORD_FILE
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        if not record.get("files"):  # a user's own checkpoint: only the registry's content hash to check against
            files = file_hashes(directory)
            if tags.get("content_hash") and tree_hash(files) != tags["content_hash"]:
                raise ServingError(
                    f"refusing to load {tags.get('artifact_id', directory.name)} from {directory}: its files no longer match the "
                    f"registered content hash {tags['content_hash'][:16]} (no per-file record to name which; re-register it with log_registered_pyfunc)"
                )
            record = {**record, "files": files, "content_hash": tags.get("content_hash")}
        record = {"model_name": self.model_name, "kind": tags.get("kind"), **{k: v for k, v in record.items() if v is not None}}
        return build_ref(directory, record, self.store)


def load_verified(ref: dict):
    """Verify every file against the reference, then load (safetensors only)."""
    from quant_pipeline.eval_results import load_model

    verify_ref(ref)
    return load_model(Path(ref["model_dir"]))


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    lock: threading.Lock


# -- the server ---------------------------------------------------------------------------------
class Server:
    """Serve one registered model by artifact ID, alias (`approved`, `production`) or `base`.

    Thread-safe: requests may come from many threads; each loaded model runs one generation at a
    time, and every request is logged exactly once (JSONL + MLflow trace)."""

    def __init__(
        self,
        tracker: MlflowTracker,
        model_name: str,
        ref: str = "production",
        store_dir: Path | None = None,
        log_prompts: bool = True,
        critical_rules: list[str] = (),
        *,
        known_refs: list[dict] = (),
    ):
        from quant_pipeline.runtime_environment import fingerprint_hash, runtime_fingerprint
        from quant_pipeline.settings import AuditSettings

        self.tracker, self.model_name, self.ref, self.log_prompts = tracker, model_name, ref, log_prompts
        self.store = Path(store_dir) if store_dir is not None else AuditSettings.from_env().store
        try:
            self.rules = [re.compile(r) for r in critical_rules]
        except re.error as e:
            raise ServingError(f"critical rule is not a valid regular expression: {e}") from None
        self.resolver = ModelResolver(tracker, model_name, self.store, list(known_refs))
        self.runtime = runtime_fingerprint()
        self.runtime_hash = fingerprint_hash(self.runtime)
        self._models: dict[str, _Loaded] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._state = threading.Lock()
        self._base: Resolved | None = None
        self._experiment_id: str | None = None
        self._current, self.alias = self.resolver.resolve(ref)
        self._ensure_loaded(self._current)  # refuse now (not on the first request) if the bytes differ

    @property
    def current(self) -> Resolved:
        return self._current

    def _ensure_loaded(self, target: Resolved) -> _Loaded:
        aid = target.artifact_id
        with self._state:
            if aid in self._models:
                return self._models[aid]
            lock = self._load_locks.setdefault(aid, threading.Lock())
        with lock:
            if aid not in self._models:
                model, tokenizer = load_verified(target.ref)
                with self._state:
                    self._models[aid] = _Loaded(model, tokenizer, threading.Lock())
        return self._models[aid]

    def _follow_alias(self) -> tuple[Resolved, str | None]:
        """Re-read the alias before a request; switch (load + verify) if it moved."""
        if self.alias is None:
            return self._current, None
        mv = self.resolver.alias_version(self.alias)
        if mv is None:
            raise ServingError(f"alias `{self.alias}` of {self.model_name} no longer exists (rejected or removed): refusing to serve")
        if str(mv.version) == self._current.version:
            return self._current, None
        target = self.resolver.for_version(mv)
        self._ensure_loaded(target)
        with self._state:
            old = self._current
            if old.version == target.version:  # another request switched first and logged it
                return old, None
            self._current = target
        return target, f"v{old.version}->v{target.version}"

    def _base_for(self, current: Resolved) -> Resolved:
        if current.kind == "base":
            return current
        with self._state:
            base = self._base
        if base is None or base.ref["content_hash"] != current.ref.get("base_hash"):
            mv = self.resolver.base_version(current.ref.get("base_hash"))
            if mv is not None:
                base = self.resolver.for_version(mv)
            else:
                known = [r for r in self.resolver.known.values() if r["kind"] == "base"]
                if not known:
                    raise ServingError(f"a critical request must be served by the base model, but {self.model_name} has no registered base version (tag kind=base)")
                base = Resolved(None, known[0])
            with self._state:
                self._base = base
        return base

    def _route(self, prompt: str, critical: bool, current: Resolved) -> tuple[Resolved, str]:
        if critical:
            return self._base_for(current), "critical flag"
        for rule in self.rules:
            if rule.search(prompt):
                return self._base_for(current), f"rule: {rule.pattern}"
        return current, f"ref: {self.ref}"

    def experiment_id(self) -> str | None:
        if self._experiment_id is None:
            try:
                self._experiment_id = self.tracker.experiment_id(self.model_name)
            except Exception:
                return None
        return self._experiment_id

    def generate(self, prompt: str, max_new_tokens: int = 64, seed: int = 0, critical: bool = False, request_id: str | None = None) -> dict:
        """Serve one prompt (greedy); returns its log record (also written to the JSONL and MLflow)."""
        t0, start_ns = time.perf_counter(), time.time_ns()
        record: dict = {
            "request_id": request_id or str(uuid.uuid4()),
            "time": datetime.now(timezone.utc).isoformat(),
            "model_name": self.model_name,
            "ref": self.ref,
            "status": "ok",
        }
        if not isinstance(prompt, str) or not prompt.strip():
            raise ServingError("a request needs a non-empty prompt")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ServingError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        record.update(self._prompt_fields(prompt))
        record["decoding"] = {"strategy": "greedy", "do_sample": False, "num_beams": 1, "max_new_tokens": int(max_new_tokens), "seed": int(seed)}
        try:
            current, changed = self._follow_alias()
            target, reason = self._route(prompt, bool(critical), current)
            record.update(self._provenance(target), route_reason=reason, alias_changed=changed)
            loaded = self._ensure_loaded(target)
            with loaded.lock:
                g0 = time.perf_counter()
                out = greedy_generate(loaded.model, loaded.tokenizer, prompt, int(max_new_tokens), int(seed))
                record["generate_s"] = round(time.perf_counter() - g0, 4)
            record.update(output=out["output"], output_ids=out["output_ids"], prompt_tokens=out["prompt_tokens"], output_tokens=len(out["output_ids"]))
        except Exception as e:
            record.update(status="error", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            record["latency_s"] = round(time.perf_counter() - t0, 4)
            self._write(record, start_ns)
        return record

    def _prompt_fields(self, prompt: str) -> dict:
        return {"prompt": prompt if self.log_prompts else None, "prompt_logged": self.log_prompts, "prompt_sha256": _sha256(prompt)}

    def _provenance(self, target: Resolved) -> dict:
        ref = target.ref
        recipe = ref.get("recipe") or {}
        quantized = ref["kind"] != "base"
        return {
            "model_version": target.version,
            "artifact_id": ref["artifact_id"],
            "served_by": "base" if not quantized else "quantized",
            "content_hash": ref["content_hash"],
            "base_hash": ref.get("base_hash"),
            "quant_method": recipe.get("method", "gptq") if quantized else "none",
            "bits": recipe.get("bits") if quantized else None,
            "group_size": recipe.get("group_size") if quantized else None,
            "recipe": recipe or None,
            "precision": ref.get("precision"),
            "calibration_hash": ref.get("calibration_hash"),
            "artifact_runtime_hash": ref.get("runtime_hash"),
            "runtime_hash": self.runtime_hash,
            "runtime": self.runtime,
        }

    def _write(self, record: dict, start_ns: int) -> None:
        exp_id = self.experiment_id()
        record["mlflow_experiment_id"] = exp_id
        record["trace_id"] = None
        if exp_id is not None:
            try:
                record["trace_id"] = log_trace(self.tracker.tracking_uri, exp_id, record, start_ns, time.time_ns())
            except Exception as e:  # tracing is the convenient view; the JSONL below is the record
                record["trace_error"] = f"{type(e).__name__}: {e}"
        append_jsonl(requests_path(self.store, self.model_name), record)


# -- the MLflow pyfunc ---------------------------------------------------------------------------
def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


class QuantizedLLM(mlflow.pyfunc.PythonModel):
    """A registered version: a reference to verified bytes on disk, served with per-request logging.

    Inputs: a list of prompts, a dict (one request, or columns), or a DataFrame with a `prompt`
    column and optional `critical`, `request_id`, `max_new_tokens`, `seed`. Outputs: one row per
    request with `request_id`, `output`, `artifact_id`, `served_by` (and the route and version).
    Environment: QP_STORE_DIR (where the request log goes; default the store the artifact lies in),
    QP_SERVE_REF (follow an alias such as `production` per request instead of this version),
    QP_SERVE_LOG_PROMPTS=0 (log prompt hashes only), QP_SERVE_CRITICAL_RULES (JSON list of regexes)."""

    def load_context(self, context) -> None:
        from quant_pipeline.paths import default_mlflow_uri, default_store_dir

        ref = json.loads(Path(context.artifacts["artifact_ref"]).read_text())
        config = dict(getattr(context, "model_config", None) or {})
        store = os.environ.get("QP_STORE_DIR") or config.get("store_dir") or ref.get("store_dir") or str(default_store_dir())
        rules = json.loads(os.environ["QP_SERVE_CRITICAL_RULES"]) if os.environ.get("QP_SERVE_CRITICAL_RULES") else config.get("critical_rules", [])
        log_prompts = os.environ.get("QP_SERVE_LOG_PROMPTS", str(config.get("log_prompts", True))).lower() not in ("0", "false", "no")
        tracker = MlflowTracker(tracking_uri=os.environ.get("QP_MLFLOW_TRACKING_URI") or default_mlflow_uri())
        self.server = Server(
            tracker, ref["model_name"], ref=os.environ.get("QP_SERVE_REF") or config.get("ref") or ref["artifact_id"],
            store_dir=Path(store), log_prompts=log_prompts, critical_rules=rules, known_refs=[ref],
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
            rows = pd.DataFrame(model_input).to_dict("records") if isinstance(model_input.get("prompt"), list) else [model_input]
        else:
            rows = [r if isinstance(r, dict) else {"prompt": r} for r in list(model_input)]
        out = []
        for row in rows:
            get = lambda key, default=None: default if _is_missing(row.get(key)) else row[key]  # noqa: E731
            rec = self.server.generate(
                str(get("prompt", "")),
                max_new_tokens=int(get("max_new_tokens", params.get("max_new_tokens", 64))),
                seed=int(get("seed", params.get("seed", 0))),
                critical=str(get("critical", False)).lower() in ("true", "1", "yes"),
                request_id=str(get("request_id")) if get("request_id") is not None else None,
            )  # fmt: skip
            out.append({k: rec[k] for k in ("request_id", "output", "artifact_id", "served_by", "model_version", "route_reason")})
        return pd.DataFrame(out) if as_frame else out


# -- reproduction -------------------------------------------------------------------------------
def reproduce(tracker: MlflowTracker, store_dir: Path, model_name: str, request_id: str, current_fingerprint: dict | None = None) -> dict:
    """Re-run a logged request on the exact logged artifact (hashes verified) with its logged
    decoding, and compare token ids; `runtime_warnings` names what changed in the runtime since."""
    from quant_pipeline.runtime_environment import fingerprint_changes, fingerprint_hash, runtime_fingerprint

    entry = find_request(store_dir, model_name, request_id)
    if entry.get("status", "ok") != "ok":
        raise ServingError(f"request {request_id} failed when it was served ({entry.get('error')}): there is no output to reproduce")
    prompt = entry.get("prompt")
    if prompt is None:
        raise ServingError(
            f"request {request_id} was logged without its prompt (log_prompts off: only its sha256 {entry['prompt_sha256'][:16]}… "
            "was kept), so it cannot be re-run; reproduction needs requests served with prompt logging on"
        )
    if _sha256(prompt) != entry["prompt_sha256"]:
        raise ServingError(f"request {request_id}: the logged prompt does not match its logged sha256: the log entry was altered")
    decoding = entry["decoding"]
    if decoding.get("strategy") != "greedy":
        raise ServingError(f"request {request_id} used {decoding.get('strategy')} decoding: only greedy requests reproduce exactly")
    resolver = ModelResolver(tracker, model_name, Path(store_dir))
    ref = resolver.ref_for_artifact(entry["artifact_id"])
    if ref["content_hash"] != entry["content_hash"]:
        raise ServingError(f"artifact {entry['artifact_id']} now has content hash {ref['content_hash'][:16]}, the request was served by {entry['content_hash'][:16]}")
    model, tokenizer = load_verified(ref)
    out = greedy_generate(model, tokenizer, prompt, int(decoding["max_new_tokens"]), int(decoding.get("seed", 0)))
    current = current_fingerprint if current_fingerprint is not None else runtime_fingerprint()
    warnings = fingerprint_changes(entry.get("runtime") or {}, current)
    div = first_divergence(entry["output_ids"], out["output_ids"])
    result = {
        "request_id": request_id,
        "artifact_id": entry["artifact_id"],
        "content_hash": ref["content_hash"],
        "status": "reproduced exactly" if div is None else "diverged",
        "logged_output": entry["output"],
        "output": out["output"],
        "logged_output_ids": entry["output_ids"],
        "output_ids": out["output_ids"],
        "runtime_warnings": warnings,
        "logged_runtime_hash": entry.get("runtime_hash"),
        "current_runtime_hash": fingerprint_hash(current),
    }
    if div is not None:
        result["first_divergent_token"] = div
    return result


# -- CLI ------------------------------------------------------------------------------------------
def _resources():
    from quant_pipeline.definitions import build_resources

    resources = build_resources()
    return resources["settings"], resources["mlflow"]


def _model_name(settings, given: str | None) -> str:
    if given:
        return given
    from quant_pipeline.base_checkpoint import resolve_model_source

    return resolve_model_source(settings.model).name


def serve_command(args) -> int:
    import sys

    settings, tracker = _resources()
    server = Server(tracker, _model_name(settings, args.model_name), args.ref, settings.store, log_prompts=not args.no_log_prompts, critical_rules=args.critical_rule)
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for prompt in prompts:
        rec = server.generate(prompt, max_new_tokens=args.max_new_tokens, seed=args.seed, critical=args.critical)
        keys = ("request_id", "model_version", "artifact_id", "served_by", "route_reason", "alias_changed", "latency_s", "output")
        print(json.dumps({k: rec.get(k) for k in keys}, ensure_ascii=False))
    return 0


def reproduce_command(args) -> int:
    settings, tracker = _resources()
    result = reproduce(tracker, settings.store, _model_name(settings, args.model_name), args.request_id)
    line = f"{args.request_id}: {result['status']} on {result['artifact_id']}"
    if "first_divergent_token" in result:
        line += f" (first divergent token {result['first_divergent_token']}: logged {result['logged_output']!r}, now {result['output']!r})"
    print(line)
    for warning in result["runtime_warnings"]:
        print(f"  runtime changed since the request: {warning}")
    return 0 if result["status"] == "reproduced exactly" else 1


def add_cli(subparsers) -> None:
    """`serve` and `reproduce` subcommands (each sets `func`, returning an exit code)."""
    serve = subparsers.add_parser("serve", help="answer prompts from a registered model, logging each request's provenance")
    serve.add_argument("--model-name", help="registered model (default: the configured model's name)")
    serve.add_argument("--ref", default="production", help="artifact ID, alias (approved, production) or `base` (default: production)")
    serve.add_argument("--prompt", action="append", help="a prompt (repeatable); without it, one prompt per stdin line")
    serve.add_argument("--critical", action="store_true", help="serve with the full-precision base model")
    serve.add_argument("--critical-rule", action="append", default=[], help="regex; matching prompts are served by the base model (repeatable)")
    serve.add_argument("--no-log-prompts", action="store_true", help="log each prompt's sha256 instead of its text (such requests cannot be reproduced)")
    serve.add_argument("--max-new-tokens", type=int, default=64)
    serve.add_argument("--seed", type=int, default=0)
    serve.set_defaults(func=serve_command)
    rep = subparsers.add_parser("reproduce", help="re-run a logged request on its exact artifact and compare outputs token by token")
    rep.add_argument("request_id")
    rep.add_argument("--model-name", help="registered model (default: the configured model's name)")
    rep.set_defaults(func=reproduce_command)


__all__ = [
    "QuantizedLLM", "Server", "ServingError", "add_cli", "build_ref", "find_request", "find_trace",
    "log_registered_pyfunc", "read_requests", "reproduce", "requests_path", "verify_ref",
]  # fmt: skip
