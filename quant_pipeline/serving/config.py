"""How a server routes and protects itself: the canary split or shadow, token budgets, backpressure.

These are an operator's decisions, not a model's, so they live in one small YAML file beside the
deployment (`serving.example.yaml` documents every field) rather than in the registry: the registry
says *which* versions may serve (aliases `production` and `canary`, each approved), this file says
*how much* traffic the canary sees and how much work one request may ask for.

Bad input is refused before the server starts, in one line naming the file and the field
(`quant-pipeline serve` exits 2), never at the first request.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.records import RequestBudget, first_error, read_yaml_mapping

EXAMPLE_FILE = Path(__file__).with_name("serving.example.yaml")

# Booleans are refused where numbers are meant: YAML reads `yes` as true, and true is not a share of 1.
Share = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]


class ServingConfigError(AuditInputError):
    """A serving config that cannot be used (the message names the file, the field and the fix)."""


class ServingConfig(BaseModel):
    """Routing, budgets and backpressure of one server (defaults: production only, one request at a time)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Share of requests the `canary` alias answers in split mode, chosen by request ID (serving/arms.py).
    canary_share: Share = 0.0
    # split: each request is answered by one arm. shadow: production answers every request and the
    # canary runs the same prompt afterwards, for comparison only (it doubles the work per request).
    mode: Literal["split", "shadow"] = "split"
    # Per-request budgets: a request over either is refused (HTTP 400, status over_budget), not truncated.
    max_prompt_tokens: PositiveInt = 2048
    max_new_tokens: PositiveInt = 512
    # Backpressure: requests generating at once, and requests waiting for a slot; beyond both, a request
    # is answered busy at once (HTTP 503) instead of piling up.
    max_concurrency: PositiveInt = 1
    max_queue: Annotated[StrictInt, Field(ge=0)] = 8
    # Seconds from a request's arrival to its answer, queueing included; past it generation stops
    # between two tokens and the request is answered timeout (HTTP 504).
    request_timeout_s: Annotated[float, Field(gt=0, strict=True)] = 120.0
    # Log prompts in full (false: only their sha256; such requests cannot be reproduced).
    log_prompts: StrictBool = True

    @property
    def canary_enabled(self) -> bool:
        """Whether the server looks up the canary at all: a split with a share, or shadow mode."""
        return self.mode == "shadow" or self.canary_share > 0

    @property
    def budget(self) -> RequestBudget:
        return RequestBudget(max_prompt_tokens=self.max_prompt_tokens, max_new_tokens=self.max_new_tokens)


def load_serving_config(path: Path | str) -> ServingConfig:
    """Read and validate a serving config file; refuse in one line naming the file and the field."""
    path = Path(path)
    fix = f"see {EXAMPLE_FILE.name} in quant_pipeline/serving/ for every field"
    raw = read_yaml_mapping(
        path, ServingConfigError, "serving config", "pass --config an existing YAML file",
        "of fields (canary_share, mode, ...)", fix, empty_ok=True,
    )  # fmt: skip
    if raw is None:
        return ServingConfig()  # an empty file: every default
    try:
        return ServingConfig.model_validate(raw)
    except ValidationError as e:
        field, message = first_error(e)
        first = e.errors()[0]
        given = f" (got {first['input']!r})" if first["type"] != "extra_forbidden" and "input" in first else ""
        raise ServingConfigError(f"{path}: field `{field}`: {message}{given}; {fix}") from None
