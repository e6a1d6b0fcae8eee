"""Reproducing a logged request: the exact logged artifact, the logged decoding, token ids compared.

`reproduce` names what changed in the runtime since the request was served, so a divergence can be
told apart from a changed kernel or library.
"""

from __future__ import annotations

from pathlib import Path

from quant_pipeline.core.hashing import sha256_text
from quant_pipeline.core.runtime import fingerprint_changes, fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.evaluation.statistics import first_divergence
from quant_pipeline.release.reference import ServingError
from quant_pipeline.serving.request_log import find_request
from quant_pipeline.serving.resolver import ModelResolver, load_verified
from quant_pipeline.serving.server import greedy_generate


def reproduce(
    tracker: MlflowTracker, store_dir: Path, model_name: str, request_id: str, current_fingerprint: dict | None = None
) -> dict:
    """Re-run a logged request on the exact logged artifact (hashes verified) with its logged
    decoding, and compare token ids; `runtime_warnings` names what changed in the runtime since."""
    entry = find_request(store_dir, model_name, request_id)
    if entry.get("status", "ok") != "ok":
        raise ServingError(
            f"request {request_id} failed when it was served ({entry.get('error')}): there is no output to reproduce"
        )
    prompt = entry.get("prompt")
    if prompt is None:
        raise ServingError(
            f"request {request_id} was logged without its prompt "
            f"(log_prompts off: only its sha256 {entry['prompt_sha256'][:16]}… "
            "was kept), so it cannot be re-run; reproduction needs requests served with prompt logging on"
        )
    if sha256_text(prompt) != entry["prompt_sha256"]:
        raise ServingError(
            f"request {request_id}: the logged prompt does not match its logged sha256: the log entry was altered"
        )
    decoding = entry["decoding"]
    if decoding.get("strategy") != "greedy":
        raise ServingError(
            f"request {request_id} used {decoding.get('strategy')} decoding: only greedy requests reproduce exactly"
        )
    resolver = ModelResolver(tracker, model_name, Path(store_dir))
    ref = resolver.ref_for_artifact(entry["artifact_id"])
    if ref["content_hash"] != entry["content_hash"]:
        raise ServingError(
            f"artifact {entry['artifact_id']} now has content hash {ref['content_hash'][:16]}, "
            f"the request was served by {entry['content_hash'][:16]}"
        )
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
