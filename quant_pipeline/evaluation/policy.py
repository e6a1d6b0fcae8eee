"""The tolerance policy: the bar a quantized model must clear, written down before measuring.

Tolerances come from a YAML policy written before measuring (its hash is in the report), so a
result cannot be made to pass by choosing the bar afterwards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ValidationError

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file

# What a metric means when it is the quantized model's agreement with the base: the base agrees
# with itself perfectly, so its reference value is fixed.
REFERENCE_VALUES = {"top1_agreement": 1.0, "kl_divergence": 0.0, "exact_match": 1.0, "prefix_agreement": 1.0}
KNOWN_METRICS = (
    "acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte",
    "top1_agreement", "kl_divergence", "exact_match", "prefix_agreement",
    "format_validity", "tool_call_validity", "refusal_rate", "over_refusal_rate",
    "toxicity_rate", "pii_rate", "repetition_rate", "degeneration_rate", "bias_gap",
    "latency_p50_s", "latency_p95_s", "latency_p99_s", "tokens_per_second",
    "load_peak_rss_mb", "generation_peak_rss_mb",
)  # fmt: skip


class Tolerance(BaseModel, extra="forbid"):
    direction: Literal["higher_is_better", "lower_is_better"]
    mode: Literal["absolute", "relative"] = "absolute"
    tolerance: float
    per_category: dict[str, float] = {}
    min_items: int | None = None

    def for_category(self, category: str) -> float:
        return self.per_category.get(category, self.tolerance)


class Policy(BaseModel, extra="forbid"):
    name: str
    min_items: int = 20
    allow_override: bool = False  # may two named people approve an artifact that failed its checks?
    tolerances: dict[str, Tolerance]


def load_policy(path: Path) -> tuple[Policy, str]:
    """Parse and validate a policy file; return it with its content hash."""
    if not path.is_file():
        raise AuditInputError(f"policy file {path} does not exist: set settings.policy_file (QP_POLICY_FILE)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise AuditInputError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise AuditInputError(f"{path}: expected a mapping with `name` and `tolerances`")
    for metric in raw.get("tolerances") or {}:
        if metric not in KNOWN_METRICS:
            raise AuditInputError(
                f"{path}: tolerances.{metric}: unknown metric '{metric}'; known metrics: {', '.join(KNOWN_METRICS)}"
            )
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise AuditInputError(f"{path}: field `{field}`: {err['msg']}") from None
    if not policy.tolerances:
        raise AuditInputError(f"{path}: `tolerances` is empty: give at least one metric")
    return policy, sha256_file(path)
