"""The log record of one request: its fixed shape, and the provenance of the bytes that answered it.

Every record carries every field of the contract from the moment it is created (null until known),
so an entry for a request that was refused early (busy, over budget) has the same keys as an
answered one, and a reader never has to guess whether a missing key means "no" or "not recorded".
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from quant_pipeline.core.hashing import sha256_text
from quant_pipeline.core.records import SCHEMA_VERSION

if TYPE_CHECKING:
    from quant_pipeline.serving.resolver import Resolved

# `server` below is the `Server` asking (its name, ref, config, prompt logging, runtime): passed in, not
# imported, since the server imports this module.


def new_record(server, request_id: str | None, prompt: str, max_new_tokens: int, seed: int) -> dict:
    """A request's record before routing: who asked what, under which budget; the rest null."""
    return {
        "request_id": request_id or str(uuid.uuid4()),
        "time": datetime.now(UTC).isoformat(),
        "model_name": server.model_name,
        "ref": server.ref,
        "status": "ok",
        "error": None,
        "schema_version": SCHEMA_VERSION,
        "prompt": prompt if server.log_prompts else None,
        "prompt_logged": server.log_prompts,
        "prompt_sha256": sha256_text(prompt),
        "decoding": {
            "strategy": "greedy",
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": int(max_new_tokens),
            "seed": int(seed),
        },
        "budget": server.config.budget.model_dump(mode="json"),
        # routing: which arm, why, and whether another arm had to answer
        "arm": None,
        "arm_reason": None,
        "arm_bucket": None,
        "route_reason": None,
        "fallback": False,
        "fallback_reason": None,
        "alias_changed": None,
        "canary_changed": None,
        # what answered
        "model_version": None,
        "artifact_id": None,
        "content_hash": None,
        "served_by": None,
        # the answer
        "output": None,
        "output_ids": None,
        "prompt_tokens": None,
        "output_tokens": None,
        "latency_s": None,
        "generate_s": None,
        "refused": False,
        "validation": None,
        "shadow": None,
        "allow_unapproved": server.allow_unapproved,
    }


def provenance(server, target: Resolved) -> dict:
    """Which exact bytes answer: registry version, artifact, hashes, recipe, and the runtime they ran on."""
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
        "runtime_hash": server.runtime_hash,
        "runtime": server.runtime,
        "allow_unapproved": server.allow_unapproved,
    }
