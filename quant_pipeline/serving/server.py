"""Serving registered models with per-request provenance.

An alias is looked up again before every request, so moving `production` back (a rollback) takes
effect on the next request without a restart. Requests flagged critical, or matching a critical
rule, are served by the full-precision base model. Every request is logged exactly once.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch

from quant_pipeline.core.hashing import sha256_text
from quant_pipeline.core.paths import default_store_dir
from quant_pipeline.core.records import SCHEMA_VERSION
from quant_pipeline.core.runtime import fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.evaluation.generation import generate_greedy
from quant_pipeline.release.reference import ServingError
from quant_pipeline.serving.request_log import append_request, log_trace
from quant_pipeline.serving.resolver import ModelResolver, Resolved, load_verified, unapproved_reason


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0) -> dict:
    """One prompt, greedy: the audit's own `generate_greedy` with batch size 1 (no padding), so a
    served output and its reproduction take exactly the path the evaluation took."""
    torch.manual_seed(seed)
    return generate_greedy(model, tokenizer, [prompt], [max_new_tokens], batch_size=1)[0]


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    lock: threading.Lock


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
        allow_unapproved: bool = False,
    ):
        self.tracker, self.model_name, self.ref, self.log_prompts = tracker, model_name, ref, log_prompts
        self.allow_unapproved = allow_unapproved  # for testing only: written into every request it serves
        self.store = ArtifactStore.of(store_dir if store_dir is not None else default_store_dir())
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

    def _admit(self, target: Resolved) -> None:
        """Refuse bytes without a recorded sign-off, however the alias or ref came to name them."""
        reason = unapproved_reason(self.store, self.model_name, target.ref)
        if reason and not self.allow_unapproved:
            via = f"alias `{self.alias}` -> v{target.version}" if self.alias else f"`{self.ref}`"
            raise ServingError(
                f"refusing to serve {via}: {reason}; serve an approved version, sign this one off "
                "(`quant-pipeline approve`), or pass --allow-unapproved for testing"
            )

    def _ensure_loaded(self, target: Resolved) -> _Loaded:
        self._admit(target)
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
            raise ServingError(
                f"alias `{self.alias}` of {self.model_name} no longer exists (rejected or removed): refusing to serve"
            )
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
                    raise ServingError(
                        f"a critical request must be served by the base model, "
                        f"but {self.model_name} has no registered base version (tag kind=base)"
                    )
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

    def generate(
        self,
        prompt: str,
        max_new_tokens: int = 64,
        seed: int = 0,
        critical: bool = False,
        request_id: str | None = None,
    ) -> dict:
        """Serve one prompt (greedy); returns its log record (also written to the JSONL and MLflow)."""
        t0, start_ns = time.perf_counter(), time.time_ns()
        record: dict = {
            "request_id": request_id or str(uuid.uuid4()),
            "time": datetime.now(UTC).isoformat(),
            "model_name": self.model_name,
            "ref": self.ref,
            "status": "ok",
            "schema_version": SCHEMA_VERSION,
        }
        if not isinstance(prompt, str) or not prompt.strip():
            raise ServingError("a request needs a non-empty prompt")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ServingError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        record.update(self._prompt_fields(prompt))
        record["decoding"] = {
            "strategy": "greedy",
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": int(max_new_tokens),
            "seed": int(seed),
        }
        try:
            current, changed = self._follow_alias()
            target, reason = self._route(prompt, bool(critical), current)
            record.update(self._provenance(target), route_reason=reason, alias_changed=changed)
            loaded = self._ensure_loaded(target)
            with loaded.lock:
                g0 = time.perf_counter()
                out = greedy_generate(loaded.model, loaded.tokenizer, prompt, int(max_new_tokens), int(seed))
                record["generate_s"] = round(time.perf_counter() - g0, 4)
            record.update(
                output=out["output"],
                output_ids=out["output_ids"],
                prompt_tokens=out["prompt_tokens"],
                output_tokens=len(out["output_ids"]),
            )
        except Exception as e:
            record.update(status="error", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            record["latency_s"] = round(time.perf_counter() - t0, 4)
            self._write(record, start_ns)
        return record

    def _prompt_fields(self, prompt: str) -> dict:
        return {
            "prompt": prompt if self.log_prompts else None,
            "prompt_logged": self.log_prompts,
            "prompt_sha256": sha256_text(prompt),
        }

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
            "allow_unapproved": self.allow_unapproved,
        }

    def _write(self, record: dict, start_ns: int) -> None:
        exp_id = self.experiment_id()
        record["mlflow_experiment_id"] = exp_id
        record["trace_id"] = None
        if exp_id is not None:
            try:
                record["trace_id"] = log_trace(self.tracker.uri, exp_id, record, start_ns, time.time_ns())
            except Exception as e:  # tracing is the convenient view; the JSONL below is the record
                record["trace_error"] = f"{type(e).__name__}: {e}"
        append_request(self.store.requests_path(self.model_name), record)
