"""Per-arm live signals of one time window: what the requests of that hour say about each arm.

Every rate carries its Wilson 95% interval, because a window holds tens or hundreds of requests, not
thousands: 2 failures in 40 and 50 in 1000 are both "5%", but only one of them is evidence. A rate whose
denominator is empty is *not measurable* (value None, with the reason), never 0: an arm that served no
request with a declared schema has shown nothing about schema validity, and a dashboard or a rollback rule
must not read that as "no failures". Denominators, chosen so each rate means one thing:

- error, timeout, busy, over-budget and fallback-to-base rates: over every request of the arm;
- refusal rate, latency and tokens: over the requests that completed (status "ok"), the only ones with an
  answer and a generation time;
- schema failure rate: over completed requests that declared a JSON schema; tool-call validity: over those
  that declared a tool; validation failure rate: over both (what the rollback policy compares);
- shadow agreement: over the requests that also ran on the shadow arm (identical rate, mean prefix agreement),
  with the shadow's own validation failures and refusals beside them.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Callable, Iterable

import numpy as np
from pydantic import BaseModel, Field

from quant_pipeline.evaluation.statistics import wilson_interval
from quant_pipeline.monitoring.requests import LoggedRequest

OK = "ok"
FAILURE_STATUSES = ("error", "timeout", "busy", "over_budget")


class Rate(BaseModel):
    """A proportion with its Wilson 95% interval; value None means not measurable (nothing to count over)."""

    events: int
    n: int
    value: float | None
    low: float | None
    high: float | None
    why: str | None = None  # why it is not measurable

    @property
    def measurable(self) -> bool:
        return self.n > 0

    def text(self) -> str:
        if not self.measurable:
            return f"not measurable ({self.why})"
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({self.events}/{self.n})"


def rate(events: int, n: int, why_empty: str) -> Rate:
    """`events` out of `n`, or not measurable (with `why_empty`) when n is 0."""
    if n <= 0:
        return Rate(events=0, n=0, value=None, low=None, high=None, why=why_empty)
    low, high = wilson_interval(events, n)
    return Rate(events=events, n=n, value=events / n, low=low, high=high)


class Latency(BaseModel):
    """Quantiles of completed requests' latency in seconds (None: not measurable, no completed request)."""

    n: int
    p50: float | None = None
    p95: float | None = None
    p99: float | None = None
    why: str | None = None

    @property
    def measurable(self) -> bool:
        return self.n > 0


def latency(samples: list[float]) -> Latency:
    if not samples:
        return Latency(n=0, why="no completed request with a latency")
    p50, p95, p99 = (float(q) for q in np.percentile(np.asarray(samples, dtype=float), [50, 95, 99]))
    return Latency(n=len(samples), p50=p50, p95=p95, p99=p99)


def mean_or_none(values: Iterable[float | None]) -> float | None:
    known = [float(v) for v in values if v is not None]
    return float(np.mean(known)) if known else None


class ArmSignals(BaseModel):
    """What one arm's requests of the window showed."""

    arm: str
    requests: int
    completed: int
    versions: dict[str, int]  # registry version -> requests it served ("?" when the line names none)
    error_rate: Rate
    timeout_rate: Rate
    busy_rate: Rate
    over_budget_rate: Rate
    fallback_rate: Rate
    refusal_rate: Rate
    validation_failure_rate: Rate
    schema_failure_rate: Rate
    tool_call_validity: Rate
    latency_s: Latency
    output_tokens_per_request: float | None  # mean over completed requests
    prompt_tokens_per_request: float | None
    # the completed requests' latencies, kept for intervals computed downstream (the p95 ratio's bootstrap);
    # left out of Dagster metadata, kept in the stored window
    latencies: list[float] = Field(default_factory=list, repr=False)


class ShadowSignals(BaseModel):
    """How the shadow arm's answers compared with the served ones, over the requests it shadowed. In shadow
    mode the canary serves nobody, so this is all the evidence there is about it: the same rates as an arm's
    (named alike, so the rollback policy reads either), over the shadowed requests."""

    arm: str
    pairs: int
    versions: dict[str, int]
    identical_rate: Rate
    prefix_agreement_mean: float | None
    error_rate: Rate  # shadow runs that failed (raised or timed out)
    validation_failure_rate: Rate
    refusal_rate: Rate
    latency_s: Latency
    latencies: list[float] = Field(default_factory=list, repr=False)


class WindowSignals(BaseModel):
    """Every arm's signals over one window [start, end) of one model's traffic."""

    model_name: str
    start: dt.datetime
    end: dt.datetime
    requests: int
    arms: dict[str, ArmSignals]
    shadow: dict[str, ShadowSignals]  # by shadow arm (normally just "canary")

    def arm(self, name: str) -> ArmSignals | None:
        return self.arms.get(name)

    def metrics(self) -> dict[str, float]:
        """Flat name -> value of every measurable signal (what MLflow logs per window); not measurable is
        left out rather than logged as 0."""
        out: dict[str, float] = {"requests": float(self.requests)}
        for name, arm in self.arms.items():
            out[f"{name}/requests"] = float(arm.requests)
            for key, value in arm:
                if isinstance(value, Rate) and value.measurable:
                    out[f"{name}/{key}"] = float(value.value)
            for q in ("p50", "p95", "p99"):
                if arm.latency_s.measurable:
                    out[f"{name}/latency_{q}_s"] = float(getattr(arm.latency_s, q))
            for key in ("output_tokens_per_request", "prompt_tokens_per_request"):
                if getattr(arm, key) is not None:
                    out[f"{name}/{key}"] = float(getattr(arm, key))
        for name, shadow in self.shadow.items():
            out[f"shadow_{name}/pairs"] = float(shadow.pairs)
            if shadow.identical_rate.measurable:
                out[f"shadow_{name}/identical_rate"] = float(shadow.identical_rate.value)
            if shadow.prefix_agreement_mean is not None:
                out[f"shadow_{name}/prefix_agreement_mean"] = shadow.prefix_agreement_mean
        return out


def _share(entries: list[LoggedRequest], hit: Callable[[LoggedRequest], bool], why: str) -> Rate:
    return rate(sum(1 for e in entries if hit(e)), len(entries), why)


def _validity(entries: list[LoggedRequest], kinds: tuple[str, ...], failures: bool, why: str) -> Rate:
    declared = [e.validation for e in entries if e.validation is not None and e.validation.kind in kinds]
    return rate(sum(1 for v in declared if v.valid != failures), len(declared), why)


def arm_signals(arm: str, entries: list[LoggedRequest]) -> ArmSignals:
    """One arm's signals from its requests of the window."""
    done = [e for e in entries if e.status == OK]
    none = f"no request served by {arm}"
    none_done = f"no completed request on {arm}"
    samples = [float(e.latency_s) for e in done if e.latency_s is not None]
    return ArmSignals(
        arm=arm,
        requests=len(entries),
        completed=len(done),
        versions=dict(Counter(e.model_version or "?" for e in entries)),
        error_rate=_share(entries, lambda e: e.status == "error", none),
        timeout_rate=_share(entries, lambda e: e.status == "timeout", none),
        busy_rate=_share(entries, lambda e: e.status == "busy", none),
        over_budget_rate=_share(entries, lambda e: e.status == "over_budget", none),
        fallback_rate=_share(entries, lambda e: e.fallback, none),
        refusal_rate=rate(
            sum(1 for e in done if e.refused),
            sum(1 for e in done if e.refused is not None),
            f"{none_done} with a refusal judgement",
        ),
        validation_failure_rate=_validity(done, ("schema", "tool"), True, f"{none_done} declared a schema or a tool"),
        schema_failure_rate=_validity(done, ("schema",), True, f"{none_done} declared a schema"),
        tool_call_validity=_validity(done, ("tool",), False, f"{none_done} declared a tool"),
        latency_s=latency(samples),
        output_tokens_per_request=mean_or_none(e.output_tokens for e in done),
        prompt_tokens_per_request=mean_or_none(e.prompt_tokens for e in done),
        latencies=samples,
    )


def shadow_signals(arm: str, entries: list[LoggedRequest]) -> ShadowSignals:
    """How the shadow arm `arm` compared, over the requests that carry its shadow answer."""
    shadows = [e.shadow for e in entries if e.shadow is not None and e.shadow.arm == arm]
    answered = [s for s in shadows if s.error is None]
    compared = [s for s in answered if s.identical is not None]
    judged = [s for s in answered if s.refused is not None]
    validated = [s.validation for s in answered if s.validation is not None]
    samples = [float(s.latency_s) for s in answered if s.latency_s is not None]
    none = f"no request was shadowed by {arm}"
    return ShadowSignals(
        arm=arm,
        pairs=len(shadows),
        versions=dict(Counter(s.model_version or "?" for s in shadows)),
        identical_rate=rate(sum(1 for s in compared if s.identical), len(compared), none),
        prefix_agreement_mean=mean_or_none(s.prefix_agreement for s in answered),
        error_rate=rate(len(shadows) - len(answered), len(shadows), none),
        validation_failure_rate=rate(
            sum(1 for v in validated if not v.valid), len(validated), "no shadowed request declared a schema or tool"
        ),
        refusal_rate=rate(sum(1 for s in judged if s.refused), len(judged), none),
        latency_s=latency(samples),
        latencies=samples,
    )


def window_signals(
    model_name: str, entries: list[LoggedRequest], start: dt.datetime, end: dt.datetime
) -> WindowSignals:
    """Every arm's signals over the window's requests (entries outside [start, end) are left out)."""
    inside = [e for e in entries if start <= e.time < end]
    by_arm: dict[str, list[LoggedRequest]] = {}
    for entry in inside:
        by_arm.setdefault(entry.served_arm, []).append(entry)
    shadow_arms = sorted({e.shadow.arm for e in inside if e.shadow is not None})
    return WindowSignals(
        model_name=model_name,
        start=start,
        end=end,
        requests=len(inside),
        arms={arm: arm_signals(arm, rows) for arm, rows in sorted(by_arm.items())},
        shadow={arm: shadow_signals(arm, inside) for arm in shadow_arms},
    )
