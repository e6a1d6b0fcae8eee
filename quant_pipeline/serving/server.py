"""Serving registered models with per-request provenance, a canary, budgets and backpressure.

The aliases `production` and `canary` are looked up again before every request, so moving either one
(a rollback, a canary promoted or pulled) takes effect on the next request without a restart. Only an
approved version (or the kept base) answers, whichever alias names it. Requests flagged critical, or
matching a critical rule, are served by the full-precision base model. The rest go to production or
to the canary by request ID (serving/arms.py); in shadow mode production answers and the canary runs
the same prompt afterwards, for the log only.

Every request is logged exactly once, answered or not (status ok, error, busy, over_budget, timeout),
so the log alone accounts for all traffic.
"""

from __future__ import annotations

import copy
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from quant_pipeline.core.paths import default_store_dir
from quant_pipeline.core.records import ShadowOutcome
from quant_pipeline.core.registry_view import CANARY_ALIAS
from quant_pipeline.core.runtime import fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.evaluation.behaviour import is_refusal
from quant_pipeline.evaluation.generation import chat_text, generate_greedy
from quant_pipeline.release.reference import ServingError
from quant_pipeline.serving.admission import (
    Admission,
    BadRequest,
    DeadlinePassed,
    OverBudget,
    RequestRefused,
    RequestTimeout,
    ServerBusy,
)
from quant_pipeline.serving.arms import check_declared_format, choose_arm, shadow_outcome, validate_output
from quant_pipeline.serving.config import ServingConfig
from quant_pipeline.serving.provenance import new_record, provenance
from quant_pipeline.serving.request_log import append_request, log_trace
from quant_pipeline.serving.resolver import AliasWatch, ModelResolver, Resolved, load_verified, unapproved_reason


def greedy_generate(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0, on_step=None) -> dict:
    """One prompt, greedy: the audit's own `generate_greedy` with batch size 1 (no padding), so a
    served output and its reproduction take exactly the path the evaluation took."""
    torch.manual_seed(seed)
    return generate_greedy(model, tokenizer, [prompt], [max_new_tokens], batch_size=1, on_step=on_step)[0]


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    lock: threading.Lock  # one generation at a time per model
    counter: object  # a copy of the tokenizer for budget checks: a fast tokenizer is not safe to share
    counter_lock: threading.Lock


class Server:
    """Serve one registered model by artifact ID, alias (`approved`, `production`) or `base`, with the
    `canary` alias beside it when `config` asks for a split or a shadow.

    Thread-safe: requests may come from many threads; at most `config.max_concurrency` generate at
    once and `config.max_queue` wait (serving/admission.py), and every request is logged exactly once
    (JSONL + MLflow trace; a busy refusal is a JSONL line only, so overload adds no tracing work)."""

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
        config: ServingConfig | None = None,
    ):
        self.config = config if config is not None else ServingConfig()
        self.tracker, self.model_name, self.ref = tracker, model_name, ref
        self.log_prompts = log_prompts and self.config.log_prompts
        self.allow_unapproved = allow_unapproved  # for testing only: written into every request it serves
        self.store = ArtifactStore.of(store_dir if store_dir is not None else default_store_dir())
        try:
            self.rules = [re.compile(r) for r in critical_rules]
        except re.error as e:
            raise ServingError(f"critical rule is not a valid regular expression: {e}") from None
        self.resolver = ModelResolver(tracker, model_name, self.store, list(known_refs))
        self.runtime = runtime_fingerprint()
        self.runtime_hash = fingerprint_hash(self.runtime)
        self.admission = Admission(self.config.max_concurrency, self.config.max_queue)
        self._models: dict[str, _Loaded] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._state = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._base: Resolved | None = None
        self.canary = AliasWatch(self.resolver, CANARY_ALIAS)
        self._experiment_id: str | None = None
        self._current, self.alias = self.resolver.resolve(ref)
        self._ensure_loaded(self._current)  # refuse now (not on the first request) if the bytes differ
        if self.config.canary_enabled:
            version, canary, _problem, _moved = self.canary.follow()
            if canary is not None:  # warm it; a canary that may not serve is reported per request
                try:
                    self._ensure_loaded(canary, f"alias `{CANARY_ALIAS}` -> v{canary.version}")
                except ServingError:
                    pass

    @property
    def current(self) -> Resolved:
        return self._current

    def _admit(self, target: Resolved, via: str | None = None) -> None:
        """Refuse bytes without a recorded sign-off, however the alias or ref came to name them."""
        reason = unapproved_reason(self.store, self.model_name, target.ref)
        if reason and not self.allow_unapproved:
            via = via or (f"alias `{self.alias}` -> v{target.version}" if self.alias else f"`{self.ref}`")
            raise ServingError(
                f"refusing to serve {via}: {reason}; serve an approved version, sign this one off "
                "(`quant-pipeline approve`), or pass --allow-unapproved for testing"
            )

    def _ensure_loaded(self, target: Resolved, via: str | None = None) -> _Loaded:
        self._admit(target, via)
        aid = target.artifact_id
        with self._state:
            if aid in self._models:
                return self._models[aid]
            lock = self._load_locks.setdefault(aid, threading.Lock())
        with lock:
            if aid not in self._models:
                model, tokenizer = load_verified(target.ref)
                loaded = _Loaded(model, tokenizer, threading.Lock(), copy.deepcopy(tokenizer), threading.Lock())
                with self._state:
                    self._models[aid] = loaded
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

    def _critical_reason(self, prompt: str, critical: bool) -> str | None:
        if critical:
            return "critical flag"
        return next((f"rule: {rule.pattern}" for rule in self.rules if rule.search(prompt)), None)

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
        *,
        schema: dict | None = None,
        tool: dict | None = None,
        deadline: float | None = None,
    ) -> dict:
        """Serve one prompt (greedy); returns its log record (also written to the JSONL and MLflow).

        Raises `BadRequest` (nothing logged) for a request that cannot be served as asked, a
        `RequestRefused` (over budget, busy, timeout; logged) when it was not answered, and whatever
        generation raised (logged with status error). `deadline` is a `time.monotonic()` value
        (default: now + request_timeout_s); `schema` / `tool` ask for the answer to be validated."""
        t0, start_ns = time.perf_counter(), time.time_ns()
        deadline = time.monotonic() + self.config.request_timeout_s if deadline is None else deadline
        if not isinstance(prompt, str) or not prompt.strip():
            raise BadRequest("a request needs a non-empty prompt")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise BadRequest(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        try:
            check_declared_format(schema, tool)
        except ValueError as e:
            raise BadRequest(str(e)) from None
        record = new_record(self, request_id, prompt, max_new_tokens, seed)
        try:
            self._check_budget(record, prompt, max_new_tokens)
            slot = self.admission.enter(deadline)
            if slot == "busy":
                limits = f"{self.config.max_concurrency} generating, {self.config.max_queue} waiting"
                raise ServerBusy(f"server busy ({limits}): retry later", record)
            if slot == "timeout":
                raise RequestTimeout(f"no generation slot within {self.config.request_timeout_s}s", record)
            try:
                self._answer(record, prompt, max_new_tokens, int(seed), critical, schema, tool, deadline)
            finally:
                self.admission.leave()
        except RequestRefused as e:
            record.update(status=e.status, error=str(e))
            raise
        except DeadlinePassed:
            msg = f"timed out after {self.config.request_timeout_s}s (request_timeout_s) while generating"
            record.update(status="timeout", error=msg)
            raise RequestTimeout(msg, record) from None
        except Exception as e:
            record.update(status="error", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            record["latency_s"] = round(time.perf_counter() - t0, 4)
            self._write(record, start_ns)
        return record

    def _check_budget(self, record: dict, prompt: str, max_new_tokens: int) -> None:
        """Refuse what exceeds the budgets before queueing: such a request could never be served."""
        budget = self.config.budget
        if max_new_tokens > budget.max_new_tokens:
            raise OverBudget(
                f"max_new_tokens {max_new_tokens} is over this server's budget of {budget.max_new_tokens} "
                f"(max_new_tokens): ask for at most {budget.max_new_tokens}",
                record,
            )
        with self._state:
            loaded = self._models[self._current.artifact_id]  # the arms share the model's tokenizer
        with loaded.counter_lock:
            text = chat_text(loaded.counter, prompt)
            record["prompt_tokens"] = len(loaded.counter(text, add_special_tokens=False)["input_ids"])
        if record["prompt_tokens"] > budget.max_prompt_tokens:
            raise OverBudget(
                f"the prompt is {record['prompt_tokens']} tokens (chat template included), over this server's "
                f"budget of {budget.max_prompt_tokens} (max_prompt_tokens): shorten it",
                record,
            )

    def _answer(self, record, prompt, max_new_tokens, seed, critical, schema, tool, deadline) -> None:
        """Route, generate, validate, shadow: fills the record of a request that holds a slot."""
        current, record["alias_changed"] = self._follow_alias()
        target, loaded, shadow_of = current, None, None
        critical_reason = self._critical_reason(prompt, bool(critical))
        if critical_reason:
            target, arm, reason, route = self._base_for(current), "base", critical_reason, critical_reason
        else:
            version, canary, problem = None, None, None
            if self.config.canary_enabled:
                version, canary, problem, record["canary_changed"] = self.canary.follow()
            choice = choose_arm(record["request_id"], self.config, version)
            arm, reason, route, record["arm_bucket"] = choice.arm, choice.reason, f"ref: {self.ref}", choice.bucket
            if choice.arm == "canary":
                try:
                    if canary is None:
                        raise ServingError(problem)
                    loaded = self._ensure_loaded(canary, f"alias `{CANARY_ALIAS}` -> v{version}")
                    target, route = canary, f"ref: {CANARY_ALIAS}"
                except ServingError as e:  # never unapproved bytes: production answers, and the log says why
                    arm, reason = "production", f"{reason}; canary v{version} cannot serve: production answers"
                    record.update(fallback=True, fallback_reason=str(e))
            if choice.shadow:
                shadow_of = (version, canary, problem)
        record.update(provenance(self, target), arm=arm, arm_reason=reason, route_reason=route)
        loaded = loaded or self._ensure_loaded(target)
        out, record["generate_s"] = self._run(loaded, prompt, max_new_tokens, seed, deadline)
        validation = validate_output(out["output"], schema, tool)
        record.update(
            output=out["output"],
            output_ids=out["output_ids"],
            prompt_tokens=out["prompt_tokens"],
            output_tokens=len(out["output_ids"]),
            refused=is_refusal(out["output"]),
            validation=validation.model_dump(mode="json") if validation else None,
        )
        if shadow_of is not None:
            record["shadow"] = self._shadow(*shadow_of, prompt, max_new_tokens, seed, out["output_ids"], schema, tool)

    def _run(self, loaded: _Loaded, prompt: str, max_new_tokens: int, seed: int, deadline: float) -> tuple[dict, float]:
        def check_deadline(_finished, _tokens) -> None:
            if time.monotonic() > deadline:
                raise DeadlinePassed

        with loaded.lock:
            g0 = time.perf_counter()
            out = greedy_generate(loaded.model, loaded.tokenizer, prompt, max_new_tokens, seed, check_deadline)
            return out, round(time.perf_counter() - g0, 4)

    def _shadow(self, version, canary, problem, prompt, max_new_tokens, seed, answer_ids, schema, tool) -> dict:
        """The canary on the same prompt, after production answered: logged beside it, never returned.
        A shadow that fails is recorded as such; it never changes the answer or its status."""
        fields = {"model_version": version}
        if canary is not None:
            fields.update(artifact_id=canary.artifact_id, content_hash=canary.ref["content_hash"])
        t0 = time.perf_counter()
        try:
            if canary is None:
                raise ServingError(problem)
            loaded = self._ensure_loaded(canary, f"alias `{CANARY_ALIAS}` -> v{version}")
            deadline = time.monotonic() + self.config.request_timeout_s
            out, _ = self._run(loaded, prompt, max_new_tokens, seed, deadline)
        except DeadlinePassed:
            error = f"timed out after {self.config.request_timeout_s}s (request_timeout_s)"
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        else:
            validation = validate_output(out["output"], schema, tool)
            latency = round(time.perf_counter() - t0, 4)
            outcome = shadow_outcome(
                answer_ids, out, latency_s=latency, refused=is_refusal(out["output"]), validation=validation, **fields
            )
            return outcome.model_dump(mode="json")
        return ShadowOutcome(error=error, latency_s=round(time.perf_counter() - t0, 4), **fields).model_dump(
            mode="json"
        )

    def state(self) -> dict:
        """What serves right now, from memory (no registry call): for health checks."""
        with self._state:
            current, canary = self._current, self.canary.seen
        return {
            "model_name": self.model_name,
            "ref": self.ref,
            "production": {"model_version": current.version, "artifact_id": current.artifact_id},
            "canary": {"model_version": canary} if self.config.canary_enabled and canary else None,
            "mode": self.config.mode,
            "canary_share": self.config.canary_share,
        }

    def stats(self) -> dict:
        """Requests generating and waiting now, and how many ended in each status since the start."""
        in_flight, queued = self.admission.snapshot()
        with self._state:
            counts = dict(self._counts)
        return {
            "in_flight": in_flight,
            "queued": queued,
            "served": counts.get("ok", 0),
            **{status: counts.get(status, 0) for status in ("busy", "over_budget", "timeout", "error")},
            "max_concurrency": self.config.max_concurrency,
            "max_queue": self.config.max_queue,
        }

    def _write(self, record: dict, start_ns: int) -> None:
        exp_id = self.experiment_id() if record["status"] != "busy" else None
        record["mlflow_experiment_id"] = exp_id
        record["trace_id"] = None
        if exp_id is not None:
            try:
                record["trace_id"] = log_trace(self.tracker.uri, exp_id, record, start_ns, time.time_ns())
            except Exception as e:  # tracing is the convenient view; the JSONL below is the record
                record["trace_error"] = f"{type(e).__name__}: {e}"
        append_request(self.store.requests_path(self.model_name), record)
        with self._state:
            self._counts[record["status"]] += 1
