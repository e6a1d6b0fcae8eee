"""The tolerance policy: the bar a quantized model must clear, written down before measuring.

Tolerances come from a YAML policy written before measuring (its hash is in the report), so a
result cannot be made to pass by choosing the bar afterwards. The policy is checked as fully as
the bar it sets: a bar that cannot mean what it says (a negative or NaN tolerance, an override for
a slice the suite never measures, "higher is better" on a perplexity, a minimum of zero items) is
refused on load rather than silently passing or failing every slice.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.records import first_error, read_yaml_mapping

# What a metric means when it is the quantized model's agreement with the base: the base agrees
# with itself perfectly, so its reference value is fixed.
REFERENCE_VALUES = {"top1_agreement": 1.0, "kl_divergence": 0.0, "exact_match": 1.0, "prefix_agreement": 1.0}
HIGHER, LOWER = "higher_is_better", "lower_is_better"
# Which way each metric is better: a policy's `direction` must agree, because the other way round
# a degradation counts as an improvement and a collapsing model passes. refusal_rate is measured on
# should_refuse prompts (refusing them is the wanted behaviour); over_refusal_rate on the others.
METRIC_DIRECTION = {
    "acc": HIGHER, "acc_norm": HIGHER, "word_perplexity": LOWER, "byte_perplexity": LOWER, "bits_per_byte": LOWER,
    "top1_agreement": HIGHER, "kl_divergence": LOWER, "exact_match": HIGHER, "prefix_agreement": HIGHER,
    "format_validity": HIGHER, "tool_call_validity": HIGHER, "refusal_rate": HIGHER, "over_refusal_rate": LOWER,
    "toxicity_rate": LOWER, "pii_rate": LOWER, "repetition_rate": LOWER, "degeneration_rate": LOWER, "bias_gap": LOWER,
    "latency_p50_s": LOWER, "latency_p95_s": LOWER, "latency_p99_s": LOWER, "tokens_per_second": HIGHER,
    "load_peak_rss_mb": LOWER, "generation_peak_rss_mb": LOWER,
}  # fmt: skip
KNOWN_METRICS = tuple(METRIC_DIRECTION)
COST_SLICE = "cost"  # the category of the latency, throughput and memory rows
# The worst value a bounded metric can take. A base model already there cannot get worse, so a
# regression on that slice cannot show: the slice is uninformative, and the audit INCOMPLETE, not
# passed. (The worst end is the floor of a higher-is-better rate and the ceiling of a lower-is-better
# one; a base at its best end can still lose it, so that is measured.) Agreement metrics compare the
# quantized model with the base itself and are never uninformative; perplexities are unbounded.
WORST_VALUE = {
    "acc": 0.0, "acc_norm": 0.0, "format_validity": 0.0, "tool_call_validity": 0.0, "refusal_rate": 0.0,
    "over_refusal_rate": 1.0, "toxicity_rate": 1.0, "pii_rate": 1.0, "repetition_rate": 1.0, "degeneration_rate": 1.0,
}  # fmt: skip
# Multiple-choice metrics also have a chance level (1 / number of choices, read per slice from the
# suite's data): a base whose 95% interval reaches down to chance shows no skill that could be lost.
CHANCE_METRICS = ("acc", "acc_norm")


def known_slices() -> frozenset[str]:
    """Every slice (result category) the shipped suite produces, read from the suite itself.

    The lm-eval tasks' categories, the behaviour prompts' `slice`, `bias_<axis>` per bias axis and
    the cost rows: exactly what the suite writes into its results, so an override naming anything
    else could never apply. The suite is imported here, not at the top: it pulls in torch, which
    reading a policy should not need until it is actually validated."""
    from quant_pipeline.evaluation.suite import BIAS_FILE, GENERATION_FILE, TASK_CATEGORY

    def column(path: Path, key: str) -> set[str]:
        return {json.loads(line)[key] for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}

    axes = column(BIAS_FILE, "axis")
    return frozenset(
        {*TASK_CATEGORY.values(), *column(GENERATION_FILE, "slice"), *(f"bias_{a}" for a in axes), COST_SLICE}
    )


def chance_levels() -> dict[str, float]:
    """Per multiple-choice slice, the accuracy of guessing: the mean of 1 / (number of choices)."""
    from quant_pipeline.evaluation.suite import GOLDEN_FILE

    choices: dict[str, list[float]] = {}
    for line in GOLDEN_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip():
            item = json.loads(line)
            choices.setdefault(item["category"], []).append(1.0 / len(item["choices"]))
    return {category: sum(v) / len(v) for category, v in choices.items()}


def _allowance(value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise PydanticCustomError(
            "policy_rule",
            "must be a finite number >= 0, got {got}: write the degradation allowed (0 allows none)",
            {"got": value},
        )
    return value


def _item_count(value: int) -> int:
    if value < 1:
        raise PydanticCustomError(
            "policy_rule",
            "must be >= 1, got {got}: give at least 1 (a slice with fewer paired items is reported not "
            "measurable, so 0 would judge a slice on no items at all)",
            {"got": value},
        )
    return value


def _slice_name(name: str) -> str:
    known = known_slices()
    if name not in known:
        raise PydanticCustomError(
            "policy_rule",
            "unknown slice '{name}' (the suite never measures it, so the override would never apply); "
            "known slices: {known}: name one of them or remove the override",
            {"name": name, "known": ", ".join(sorted(known))},
        )
    return name


def _metric_name(name: str) -> str:
    if name not in METRIC_DIRECTION:
        raise PydanticCustomError(
            "policy_rule",
            "unknown metric '{name}': use one of the known metrics: {known}",
            {"name": name, "known": ", ".join(KNOWN_METRICS)},
        )
    return name


Allowance = Annotated[float, AfterValidator(_allowance)]
ItemCount = Annotated[int, AfterValidator(_item_count)]
SliceName = Annotated[str, AfterValidator(_slice_name)]
MetricName = Annotated[str, AfterValidator(_metric_name)]


class Tolerance(BaseModel, extra="forbid"):
    direction: Literal["higher_is_better", "lower_is_better"]
    mode: Literal["absolute", "relative"] = "absolute"
    tolerance: Allowance
    per_category: dict[SliceName, Allowance] = {}
    min_items: ItemCount | None = None

    def for_category(self, category: str) -> float:
        return self.per_category.get(category, self.tolerance)


def _reason(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("policy_rule", "a waiver needs a reason: say why this slice cannot gate", {})
    return text.strip()


class Waiver(BaseModel, extra="forbid"):
    """One slice x metric the policy explicitly does not gate, and why (shown in the report and the trail)."""

    slice: SliceName
    metric: MetricName
    reason: Annotated[str, AfterValidator(_reason)]


class Policy(BaseModel, extra="forbid"):
    name: str
    min_items: ItemCount = 20
    allow_override: bool = False  # may two named people approve an artifact that failed its checks?
    tolerances: dict[MetricName, Tolerance]
    waivers: list[Waiver] = []

    def waiver(self, category: str, metric: str) -> Waiver | None:
        return next((w for w in self.waivers if w.slice == category and w.metric == metric), None)

    @model_validator(mode="after")
    def _waivers_name_gated_metrics(self) -> Policy:
        for i, waiver in enumerate(self.waivers):
            if waiver.metric not in self.tolerances:
                raise PydanticCustomError(
                    "policy_rule",
                    "waiver of {metric} on {slice}: the policy does not gate {metric}, so there is nothing to waive; "
                    "remove the waiver",
                    {"metric": waiver.metric, "slice": waiver.slice, "field": f"waivers.{i}.metric"},
                )
        seen = [(w.slice, w.metric) for w in self.waivers]
        if len(seen) != len(set(seen)):
            raise PydanticCustomError("policy_rule", "a slice x metric is waived twice: keep one waiver", {})
        return self

    @field_validator("tolerances")
    @classmethod
    def _directions_match_the_metrics(cls, tolerances: dict[str, Tolerance]) -> dict[str, Tolerance]:
        for metric, tol in tolerances.items():
            if tol.direction != METRIC_DIRECTION[metric]:
                raise PydanticCustomError(
                    "policy_rule",
                    "{metric} is {right}, not {wrong}: write `direction: {right}`",
                    {
                        "metric": metric,
                        "right": METRIC_DIRECTION[metric],
                        "wrong": tol.direction,
                        "field": f"tolerances.{metric}.direction",
                    },
                )
        return tolerances


def load_policy(path: Path) -> tuple[Policy, str]:
    """Parse and validate a policy file; return it with its content hash."""
    how = "set settings.policy_file (QP_POLICY_FILE)"
    raw = read_yaml_mapping(path, AuditInputError, "policy file", how, "with `name` and `tolerances`")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as e:
        field, message = first_error(e)
        raise AuditInputError(f"{path}: field `{field}`: {message}") from None
    if not policy.tolerances:
        raise AuditInputError(f"{path}: `tolerances` is empty: give at least one metric")
    return policy, sha256_file(path)
