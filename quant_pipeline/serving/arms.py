"""Which arm answers a request, and how two answers compare: pure functions, no model, no registry.

The arm is a function of the request ID alone (and the config), never of time, load or a random
draw, so a request can be re-routed after the fact (by `reproduce`, by an auditor reading the log)
and a client that retries with the same ID lands on the same model:

    bucket = int(sha256(request_id)[:8], 16) / 2**32        (uniform on [0, 1))
    canary  iff  bucket < canary_share

Critical requests are routed to the base before this rule is asked (serving/server.py).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from quant_pipeline.core.records import OutputValidation, ShadowOutcome
from quant_pipeline.core.registry_view import CANARY_ALIAS
from quant_pipeline.evaluation.behaviour import check_json_format, check_tool_call
from quant_pipeline.serving.config import ServingConfig


@dataclass(frozen=True)
class ArmChoice:
    arm: str  # "production" or "canary" ("base" is the critical route, decided before this)
    reason: str  # what the log's `arm_reason` says
    bucket: float | None  # the request's bucket, where the split was asked
    shadow: bool  # run the canary after production (shadow mode)


def bucket(request_id: str) -> float:
    """The request's place on [0, 1): the first 32 bits of sha256(request_id)."""
    return int(hashlib.sha256(request_id.encode("utf-8")).hexdigest()[:8], 16) / 2**32


def share_text(share: float) -> str:
    """0.1 -> "0.10", 0.125 -> "0.125": two decimals unless that would hide a digit."""
    two = f"{share:.2f}"
    return two if float(two) == share else f"{share:g}"


def choose_arm(request_id: str, config: ServingConfig, canary_version: str | None) -> ArmChoice:
    """The arm for one (non-critical) request. `canary_version` is the version the `canary` alias names
    right now (None: no such alias), re-read by the caller before every request."""
    if not config.canary_enabled:
        return ArmChoice("production", "production only: canary_share 0", None, False)
    if canary_version is None:
        nothing = ": nothing to shadow" if config.mode == "shadow" else ""
        return ArmChoice("production", f"no {CANARY_ALIAS} alias{nothing}", None, False)
    if config.mode == "shadow":
        return ArmChoice("production", "shadow: production answers, canary shadows", None, True)
    b, share = bucket(request_id), config.canary_share
    if b < share:
        return ArmChoice("canary", f"canary share {share_text(share)}: bucket {b:.4f} < {share_text(share)}", b, False)
    return ArmChoice("production", f"canary share {share_text(share)}: bucket {b:.4f} >= {share_text(share)}", b, False)


def prefix_agreement(a: list[int], b: list[int]) -> float:
    """Shared leading tokens over the longer output's length (1.0 for two empty outputs)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    shared = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared += 1
    return round(shared / longest, 4)


def check_declared_format(schema: object, tool: object) -> None:
    """Refuse (ValueError, one line) a request whose declared `schema` or `tool` the validators cannot use.

    Checked before any work is done, so a malformed declaration is a bad request (400), not a
    validation failure of the model's answer."""
    if schema is not None and tool is not None:
        raise ValueError("declare either `schema` or `tool`, not both")
    if schema is not None:
        if not isinstance(schema, dict):
            raise ValueError("`schema` must be a JSON Schema object")
        _check_schema(schema, "schema")
    if tool is not None:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise ValueError('`tool` must be an object with a `name`, e.g. {"name": "get_weather", "parameters": {…}}')
        parameters = tool.get("parameters")
        if parameters is not None:
            if not isinstance(parameters, dict):
                raise ValueError("`tool.parameters` must be a JSON Schema object")
            _check_schema(parameters, "tool.parameters")


def _check_schema(schema: dict, field: str) -> None:
    # imported here, as the behaviour scorer does: jsonschema builds rfc3987_syntax's grammar at import (1.7 s),
    # and MLflow imports this package to check a registered model's code whenever an audit registers a version
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        raise ValueError(f"`{field}` is not a valid JSON Schema: {e.message}") from None


def validate_output(output: str, schema: dict | None, tool: dict | None) -> OutputValidation | None:
    """The behaviour suite's own verdict on an answer (the json_format and tool_call slices' validators),
    or None when the request declared neither."""
    if schema is not None:
        ok, reason = check_json_format(output, schema)
        return OutputValidation(kind="schema", valid=ok, error=None if ok else reason)
    if tool is not None:
        ok, reason = check_tool_call(output, tool)
        return OutputValidation(kind="tool", valid=ok, error=None if ok else reason)
    return None


def shadow_outcome(answer_ids: list[int], shadow: dict, **fields) -> ShadowOutcome:
    """The canary's answer beside production's: identical token ids, and how far they agree."""
    ids = shadow["output_ids"]
    return ShadowOutcome(
        output=shadow["output"],
        output_ids=ids,
        identical=ids == answer_ids,
        prefix_agreement=prefix_agreement(answer_ids, ids),
        **fields,
    )
