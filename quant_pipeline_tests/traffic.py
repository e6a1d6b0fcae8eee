"""Synthetic served traffic for the monitoring tests: request-log lines as the server writes them, with exact
counts of each outcome (so a test knows every rate it will read back), spread over one hour."""

import datetime as dt
import hashlib
import json
import random
import uuid

import numpy as np

from quant_pipeline.monitoring.drift import golden_prompts

HOUR = dt.timedelta(hours=1)
WINDOW_START = dt.datetime(2026, 11, 20, 10, tzinfo=dt.UTC)  # a past hour: every test window is this one


def line(
    time: dt.datetime, arm: str = "production", status: str = "ok", version: str = "1", **fields
) -> dict:  # fmt: skip
    """One request-log line with the fields the server writes (those not given take a plausible value)."""
    prompt = fields.pop("prompt", "What is the capital of France?")
    base = {
        "request_id": uuid.uuid4().hex, "time": time.isoformat(), "model_name": "tiny", "ref": arm,
        "status": status, "arm": arm, "arm_reason": "test traffic", "model_version": version,
        "artifact_id": f"artifact-v{version}", "content_hash": "c" * 64, "prompt": prompt,
        "prompt_sha256": hashlib.sha256(str(prompt).encode()).hexdigest(), "prompt_tokens": 12,
        "output_tokens": 8 if status == "ok" else 0, "latency_s": 0.2, "generate_s": 0.18, "fallback": False,
        "refused": False if status == "ok" else None, "validation": None, "shadow": None,
        "decoding": {"strategy": "greedy", "do_sample": False, "num_beams": 1, "max_new_tokens": 8, "seed": 0},
    }  # fmt: skip
    return {**base, **fields}


def arm_traffic(
    arm: str, n: int, *, version: str, start: dt.datetime = WINDOW_START, errors: int = 0, timeouts: int = 0,
    declared: int = 0, invalid: int = 0, refused: int = 0, latency: float = 0.2, prompts: list | None = None,
    shadow_identical: int | None = None, shadow_version: str = "2", shadow_invalid: int = 0, seed: int = 0,
) -> list[dict]:  # fmt: skip
    """`n` requests of one arm in the hour from `start`: the first `errors` fail, the next `timeouts` time out,
    the rest complete; of the completed, the first `declared` declared a schema or a tool (alternately) and the
    first `invalid` of those broke it; the first `refused` completed ones refused. Latency ~ `latency` (+-10%).
    `shadow_identical`: every request carries a canary shadow answer, the first that many identical; the shadow
    answers to the first `shadow_invalid` requests that declared a schema or tool broke it."""
    rng = np.random.default_rng(seed)
    if prompts is None:  # the golden prompts in a seeded order: traffic that looks like the golden set
        prompts = random.Random(seed).sample(golden_prompts(), len(golden_prompts()))
    out, completed = [], 0
    for i in range(n):
        status = "error" if i < errors else "timeout" if i < errors + timeouts else "ok"
        fields = {"prompt": prompts[i % len(prompts)] if prompts else None}
        if status == "ok":
            fields["latency_s"] = float(latency * (1 + 0.1 * rng.uniform(-1, 1)))
            if completed < declared:
                kind = "schema" if completed % 2 == 0 else "tool"
                ok = completed >= invalid
                fields["validation"] = {"kind": kind, "valid": ok, "error": None if ok else f"{kind} broken"}
            fields["refused"] = completed < refused
            completed += 1
        else:
            fields["latency_s"] = None
        if shadow_identical is not None:
            declared_here = fields.get("validation")
            shadow_validation = None
            if declared_here:
                shadow_ok = completed - 1 >= shadow_invalid
                shadow_validation = {**declared_here, "valid": shadow_ok, "error": None if shadow_ok else "broken"}
            fields["shadow"] = {
                "arm": "canary", "model_version": shadow_version, "artifact_id": f"artifact-v{shadow_version}",
                "output": "...", "identical": i < shadow_identical, "prefix_agreement": 1.0 if i < shadow_identical
                else 0.25, "latency_s": latency, "refused": False, "validation": shadow_validation,
            }  # fmt: skip
        out.append(line(start + HOUR * (i + 0.5) / n, arm, status, version, **fields))
    return out


def write_log(path, entries: list[dict]) -> None:
    """Append the lines through the serving package's own locked writer."""
    from quant_pipeline.serving.request_log import append_request

    path.parent.mkdir(parents=True, exist_ok=True)
    for entry in entries:
        append_request(path, entry)


def as_json_lines(entries: list[dict]) -> str:
    return "".join(json.dumps(e) + "\n" for e in entries)
