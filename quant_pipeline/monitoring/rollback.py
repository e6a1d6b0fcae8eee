"""The canary rollback policy: when live evidence says the canary is worse than production, with no person asked.

A canary is an approved version given a share of traffic before it is promoted; the audit approved it on the
golden suite, and the canary phase asks whether it holds up on real traffic. Taking it off traffic must not
wait for someone to read a dashboard, and must not happen on noise either: each criterion trips only when the
*interval* of the difference clears its threshold, never on a point estimate, and nothing trips while
production, or every source of canary evidence, has fewer than `min_requests_per_arm` requests in the window
(reported as not enough evidence, not as healthy). The canary's evidence is its own requests (split mode) and
its shadow answers to production's requests (shadow mode), each judged once it holds that many. Rolling back
is the cheap direction (traffic goes to the version production already serves); promoting a canary stays the
human sign-off's `promote`.

Intervals, all 95%:
- rate excesses (validation failures, errors, timeouts, refusals; canary rate minus production rate):
  Newcombe's hybrid score interval for a difference of independent proportions (method 10, built from each
  arm's Wilson interval); trips when its lower bound > the threshold;
- `p95_latency_ratio` (canary p95 / production p95): percentile bootstrap, each arm's completed-request
  latencies resampled independently, 2000 resamples, seed 0; trips when its lower bound > the threshold;
- `shadow_identical_min` (share of shadowed requests where the canary's output equals the served one): Wilson
  interval; trips when its *upper* bound < the minimum.

The policy is YAML (`policies/canary-rollback.yaml`, QP_ROLLBACK_POLICY); an unusable file is refused in one
line naming the file and the field.
"""

from __future__ import annotations

import datetime as dt
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.records import first_error, read_yaml_mapping
from quant_pipeline.monitoring.requests import LoggedRequest
from quant_pipeline.monitoring.signals import ArmSignals, Rate, ShadowSignals, WindowSignals

BOOTSTRAP_RESAMPLES = 2000
RATE_CRITERIA = (  # policy field -> the ArmSignals rate it compares
    ("validation_failure_excess", "validation_failure_rate"),
    ("error_rate_excess", "error_rate"),
    ("timeout_rate_excess", "timeout_rate"),
    ("refusal_rate_excess", "refusal_rate"),
)
NEWCOMBE = "Newcombe hybrid score interval (Wilson), 95%"
BOOTSTRAP = f"percentile bootstrap of the p95 ratio, {BOOTSTRAP_RESAMPLES} resamples per arm, 95%"


class RollbackPolicyError(AuditInputError):
    """A rollback policy file that cannot be used (the message names the file and the field)."""


Excess = float | None


class RollbackPolicy(BaseModel):
    """Thresholds a canary is held to against production; a criterion left out (null) is not applied."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    canary_arm: str = "canary"
    baseline_arm: str = "production"
    min_requests_per_arm: int = Field(ge=1)
    validation_failure_excess: Excess = Field(default=None, ge=0.0, lt=1.0)
    error_rate_excess: Excess = Field(default=None, ge=0.0, lt=1.0)
    timeout_rate_excess: Excess = Field(default=None, ge=0.0, lt=1.0)
    refusal_rate_excess: Excess = Field(default=None, ge=0.0, lt=1.0)
    p95_latency_ratio: Excess = Field(default=None, gt=1.0)
    shadow_identical_min: Excess = Field(default=None, gt=0.0, le=1.0)


def load_rollback_policy(path: Path | str) -> RollbackPolicy:
    """Parse and validate a rollback policy file, or refuse it in one line (file and field)."""
    path = Path(path)
    raw = read_yaml_mapping(
        path, RollbackPolicyError, "rollback policy", "set QP_ROLLBACK_POLICY to a YAML file",
        "with `name`, `min_requests_per_arm` and thresholds",
    )  # fmt: skip
    try:
        policy = RollbackPolicy.model_validate(raw)
    except ValidationError as e:
        field, message = first_error(e)
        raise RollbackPolicyError(f"{path}: field `{field}`: {message}") from None
    criteria = [f for f, _ in RATE_CRITERIA] + ["p95_latency_ratio", "shadow_identical_min"]
    if all(getattr(policy, f) is None for f in criteria):
        raise RollbackPolicyError(f"{path}: no threshold set ({', '.join(criteria)}): it could never roll back")
    return policy


class Criterion(BaseModel):
    """One threshold applied to one window: the estimate, its interval, and whether it tripped."""

    name: str  # the policy field
    source: str  # "served": the canary's own requests; "shadow": its shadow answers to production's requests
    threshold: float
    measurable: bool
    tripped: bool
    estimate: float | None = None
    low: float | None = None
    high: float | None = None
    method: str
    evidence: str


class RollbackDecision(BaseModel):
    """Whether the window's evidence takes the canary off traffic, and every number it rests on."""

    policy: str
    model_name: str
    window_start: dt.datetime
    window_end: dt.datetime
    canary_requests: int
    canary_shadowed: int
    baseline_requests: int
    canary_versions: dict[str, int]
    enough_evidence: bool
    trip: bool
    criteria: list[Criterion]
    summary: str

    @property
    def reasons(self) -> list[str]:
        return [c.evidence for c in self.criteria if c.tripped]


def newcombe_difference(a: Rate, b: Rate) -> tuple[float, float, float]:
    """(a - b, low, high): Newcombe's hybrid score interval from the two Wilson intervals (both measurable)."""
    d = a.value - b.value
    low = d - math.sqrt((a.value - a.low) ** 2 + (b.high - b.value) ** 2)
    high = d + math.sqrt((a.high - a.value) ** 2 + (b.value - b.low) ** 2)
    return d, max(-1.0, low), min(1.0, high)


def p95_ratio_interval(canary: list[float], baseline: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(ratio, low, high) of canary p95 over baseline p95, percentile bootstrap (each arm on its own)."""
    rng = np.random.default_rng(seed)

    def resampled_p95(samples: list[float]) -> np.ndarray:
        x = np.asarray(samples, dtype=float)
        out = np.empty(BOOTSTRAP_RESAMPLES)
        chunk = max(1, min(BOOTSTRAP_RESAMPLES, 2_000_000 // len(x)))
        for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
            size = min(chunk, BOOTSTRAP_RESAMPLES - start)
            out[start : start + size] = np.percentile(x[rng.integers(0, len(x), (size, len(x)))], 95, axis=1)
        return out

    floor = 1e-9  # a zero latency would make the ratio infinite
    ratios = resampled_p95(canary) / np.maximum(resampled_p95(baseline), floor)
    point = float(np.percentile(canary, 95) / max(float(np.percentile(baseline, 95)), floor))
    low, high = np.percentile(ratios, [2.5, 97.5])
    return point, float(low), float(high)


Evidence = ArmSignals | ShadowSignals  # the canary's own requests (split mode) or its shadow answers


def rate_criterion(
    name: str, signal: str, canary: Evidence, label: str, base: ArmSignals, threshold: float, source: str
) -> Criterion:  # fmt: skip
    a, b = getattr(canary, signal), getattr(base, signal)
    if not (a.measurable and b.measurable):
        missing = "; ".join(f"{who}: {r.why}" for who, r in ((label, a), (base.arm, b)) if not r.measurable)
        evidence = f"{signal} of {label} not measurable ({missing}): no trip"
        return Criterion(name=name, source=source, threshold=threshold, measurable=False, tripped=False,
                         method=NEWCOMBE, evidence=evidence)  # fmt: skip
    d, low, high = newcombe_difference(a, b)
    tripped = low > threshold
    evidence = (
        f"{signal}: {label} {a.text()} vs {base.arm} {b.text()}; excess {d:+.3f}, 95% CI "
        f"[{low:+.3f}, {high:+.3f}] {'>' if tripped else 'does not clear'} {threshold}"
    )
    return Criterion(name=name, source=source, threshold=threshold, measurable=True, tripped=tripped, estimate=d,
                     low=low, high=high, method=NEWCOMBE, evidence=evidence)  # fmt: skip


def latency_criterion(canary: Evidence, label: str, base: ArmSignals, policy: RollbackPolicy, source: str):
    threshold, name = policy.p95_latency_ratio, "p95_latency_ratio"
    short = [(who, len(s.latencies)) for who, s in ((label, canary), (base.arm, base))
             if len(s.latencies) < policy.min_requests_per_arm]  # fmt: skip
    if short:
        why = ", ".join(f"{who} {n} completed" for who, n in short)
        evidence = f"p95 latency ratio not measurable ({why}; fewer than {policy.min_requests_per_arm}): no trip"
        return Criterion(name=name, source=source, threshold=threshold, measurable=False, tripped=False,
                         method=BOOTSTRAP, evidence=evidence)  # fmt: skip
    ratio, low, high = p95_ratio_interval(canary.latencies, base.latencies)
    tripped = low > threshold
    evidence = (
        f"p95 latency: {label} {canary.latency_s.p95:.3f}s vs {base.arm} {base.latency_s.p95:.3f}s; ratio "
        f"{ratio:.2f}, 95% CI [{low:.2f}, {high:.2f}] {'>' if tripped else 'does not clear'} {threshold}"
    )
    return Criterion(name=name, source=source, threshold=threshold, measurable=True, tripped=tripped,
                     estimate=ratio, low=low, high=high, method=BOOTSTRAP, evidence=evidence)  # fmt: skip


def shadow_criterion(shadow: ShadowSignals | None, policy: RollbackPolicy) -> Criterion:
    minimum, method, name = policy.shadow_identical_min, "Wilson score interval, 95%", "shadow_identical_min"
    identical = shadow.identical_rate if shadow is not None else None
    if identical is None or identical.n < policy.min_requests_per_arm:
        n = identical.n if identical is not None else 0
        evidence = (
            f"shadow agreement of {policy.canary_arm} not measurable ({n} compared pairs, fewer than "
            f"{policy.min_requests_per_arm}): no trip"
        )
        return Criterion(name=name, source="shadow", threshold=minimum, measurable=False, tripped=False,
                         method=method, evidence=evidence)  # fmt: skip
    tripped = identical.high < minimum
    evidence = (
        f"shadow identical outputs: {identical.text()}; upper bound {identical.high:.3f} "
        f"{'<' if tripped else 'is not below'} the minimum {minimum}"
    )
    return Criterion(name=name, source="shadow", threshold=minimum, measurable=True, tripped=tripped,
                     estimate=identical.value, low=identical.low, high=identical.high, method=method,
                     evidence=evidence)  # fmt: skip


def about_version(entries: list[LoggedRequest], canary_arm: str, version: str | int) -> list[LoggedRequest]:
    """The window's requests as evidence about canary `version`: canary requests (and canary shadows) that name
    another registry version are left out, so a window served by an earlier canary never rolls back the one
    set since. A line that names no version is kept (it cannot be told apart, and the canary arm is the arm)."""
    version = str(version)
    kept = []
    for e in entries:
        if e.served_arm == canary_arm and e.model_version not in (None, version):
            continue
        if e.shadow is not None and e.shadow.arm == canary_arm and e.shadow.model_version not in (None, version):
            e = e.model_copy(update={"shadow": None})
        kept.append(e)
    return kept


def evaluate(signals: WindowSignals, policy: RollbackPolicy) -> RollbackDecision:
    """The policy applied to one window's signals: trip (roll the canary back) or not, with the evidence.

    The canary's evidence is its own requests (split mode) and its shadow answers to production's requests
    (shadow mode), each judged on its own once it holds `min_requests_per_arm`; shadow rates are compared
    with production's over the same requests, read as independent samples (conservative for paired ones)."""
    canary, base = signals.arm(policy.canary_arm), signals.arm(policy.baseline_arm)
    shadow = signals.shadow.get(policy.canary_arm)
    enough = policy.min_requests_per_arm
    versions = dict(canary.versions) if canary else {}
    for version, n in (shadow.versions if shadow else {}).items():
        versions[version] = versions.get(version, 0) + n
    frame = {
        "policy": policy.name, "model_name": signals.model_name, "window_start": signals.start,
        "window_end": signals.end, "canary_requests": canary.requests if canary else 0,
        "canary_shadowed": shadow.pairs if shadow else 0, "baseline_requests": base.requests if base else 0,
        "canary_versions": versions,
    }  # fmt: skip
    sources: list[tuple[str, str, Evidence]] = []
    if canary is not None and canary.requests >= enough:
        sources.append(("served", policy.canary_arm, canary))
    if shadow is not None and shadow.pairs >= enough:
        sources.append(("shadow", f"{policy.canary_arm} (shadow)", shadow))
    if not sources or frame["baseline_requests"] < enough:
        summary = (
            f"not enough evidence: {policy.canary_arm} served {frame['canary_requests']} and shadowed "
            f"{frame['canary_shadowed']} requests, {policy.baseline_arm} served {frame['baseline_requests']} in the "
            f"window; each side needs min_requests_per_arm {enough}: no trip"
        )
        return RollbackDecision(**frame, enough_evidence=False, trip=False, criteria=[], summary=summary)
    criteria = []
    for source, label, evidence in sources:
        criteria += [
            rate_criterion(name, signal, evidence, label, base, getattr(policy, name), source)
            for name, signal in RATE_CRITERIA
            if getattr(policy, name) is not None and hasattr(evidence, signal)
        ]
        if policy.p95_latency_ratio is not None:
            criteria.append(latency_criterion(evidence, label, base, policy, source))
    if policy.shadow_identical_min is not None:
        criteria.append(shadow_criterion(shadow, policy))
    tripped = [c for c in criteria if c.tripped]
    unmeasured = [f"{c.name} ({c.source})" for c in criteria if not c.measurable]
    if tripped:
        summary = f"roll back {policy.canary_arm}: " + "; ".join(c.evidence for c in tripped)
    else:
        summary = f"{policy.canary_arm} within policy {policy.name} ({len(criteria) - len(unmeasured)} criteria met"
        summary += f"; not measurable: {', '.join(unmeasured)})" if unmeasured else ")"
    return RollbackDecision(**frame, enough_evidence=True, trip=bool(tripped), criteria=criteria, summary=summary)
