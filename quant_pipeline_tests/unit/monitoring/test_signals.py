"""Per-arm window signals from hand-built request-log lines: rates with Wilson intervals over the right
denominators, and "not measurable" (never 0) where an arm had nothing of that kind."""

import datetime as dt
import json

import pytest

from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.evaluation.statistics import wilson_interval
from quant_pipeline.monitoring.requests import LoggedRequest, count_requests, read_log
from quant_pipeline.monitoring.signals import window_signals
from quant_pipeline_tests.traffic import HOUR, WINDOW_START, arm_traffic, as_json_lines, line, write_log


def signals_of(rows: list[dict]):
    entries = [LoggedRequest.model_validate(r) for r in rows]
    return window_signals("tiny", entries, WINDOW_START, WINDOW_START + HOUR)


def test_rates_carry_wilson_intervals_over_their_own_denominators():
    rows = arm_traffic("canary", 100, version="2", errors=5, timeouts=3, declared=40, invalid=10, refused=4)
    rows[10]["fallback"] = True
    rows[98]["status"], rows[99]["status"] = "busy", "over_budget"  # two of the completed ones, re-labelled
    arm = signals_of(rows).arms["canary"]
    assert (arm.requests, arm.completed) == (100, 90)
    assert (arm.error_rate.events, arm.error_rate.n, arm.error_rate.value) == (5, 100, 0.05)
    assert (arm.error_rate.low, arm.error_rate.high) == pytest.approx(wilson_interval(5, 100))
    assert (arm.timeout_rate.events, arm.busy_rate.events, arm.over_budget_rate.events) == (3, 1, 1)
    assert (arm.fallback_rate.events, arm.fallback_rate.n) == (1, 100)
    # refusals, validation and latency: over completed requests only (busy/over-budget lines have no answer)
    assert arm.refusal_rate.n == 90 and arm.latency_s.n == 90
    assert (arm.validation_failure_rate.events, arm.validation_failure_rate.n) == (10, 40)
    assert (arm.schema_failure_rate.events, arm.schema_failure_rate.n) == (5, 20)  # schema and tool alternate
    assert (arm.tool_call_validity.events, arm.tool_call_validity.n) == (15, 20)  # valid tool calls
    assert arm.validation_failure_rate.low < 0.25 < arm.validation_failure_rate.high
    assert arm.output_tokens_per_request == 8 and arm.versions == {"2": 100}
    assert 0.18 <= arm.latency_s.p50 <= arm.latency_s.p95 <= arm.latency_s.p99 <= 0.22


def test_an_arm_with_nothing_of_a_kind_is_not_measurable_and_not_zero():
    rows = arm_traffic("production", 30, version="1")  # nobody declared a schema or a tool
    rows += arm_traffic("canary", 5, version="2", errors=5)  # the canary never completed a request
    signals = signals_of(rows)
    prod, canary = signals.arms["production"], signals.arms["canary"]
    for rate in (prod.validation_failure_rate, prod.schema_failure_rate, prod.tool_call_validity):
        assert not rate.measurable and rate.value is None and rate.low is None and "declared" in rate.why
        assert rate.text().startswith("not measurable (")
    assert not canary.latency_s.measurable and canary.latency_s.p95 is None
    assert not canary.refusal_rate.measurable and canary.output_tokens_per_request is None
    assert canary.error_rate.value == 1.0
    metrics = signals.metrics()
    assert "production/validation_failure_rate" not in metrics and "canary/latency_p95_s" not in metrics
    assert metrics["production/error_rate"] == 0.0 and metrics["canary/error_rate"] == 1.0  # measured zeros stay
    assert signals.shadow == {}


def test_shadow_agreement_over_the_shadowed_requests():
    rows = arm_traffic("production", 81, version="1", shadow_identical=60)
    rows[-1]["shadow"].update(error="RuntimeError: boom", identical=None, prefix_agreement=None, refused=None)
    shadow = signals_of(rows).shadow["canary"]
    assert shadow.pairs == 81 and shadow.versions == {"2": 81}
    assert (shadow.error_rate.events, shadow.error_rate.n) == (1, 81)  # a failed shadow run: nothing compared
    assert (shadow.identical_rate.events, shadow.identical_rate.n) == (60, 80)
    assert shadow.prefix_agreement_mean == pytest.approx((60 * 1.0 + 20 * 0.25) / 80)
    assert len(shadow.latencies) == 80 and shadow.latency_s.n == 80
    assert not shadow.validation_failure_rate.measurable and shadow.refusal_rate.value == 0.0


def test_only_the_window_counts_and_old_lines_still_read(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    path = store.requests_path("tiny")
    inside = arm_traffic("production", 10, version="1")
    before = arm_traffic("production", 7, version="1", start=WINDOW_START - HOUR)
    # a line written before arms, validation and the new statuses existed: no arm, the `production` ref
    legacy = {k: v for k, v in line(WINDOW_START + dt.timedelta(minutes=5)).items() if k in
              ("request_id", "time", "model_name", "ref", "status", "prompt", "prompt_sha256", "decoding",
               "latency_s", "output_tokens")}  # fmt: skip
    pinned = {**legacy, "request_id": "pinned", "ref": "gptq-w4g64-abc"}  # served from a pinned artifact
    turned_away = line(WINDOW_START + dt.timedelta(minutes=6), status="busy", arm=None, latency_s=None)
    write_log(path, [*before, *inside, legacy, pinned, turned_away])
    with open(path, "a") as f:
        f.write(json.dumps({"no": "time"}) + "\n" + '{"time": "2026-11-20T10:')  # not a request; a torn line
    log = read_log(store, "tiny")
    assert log.unreadable == 1 and len(log.entries) == 20 and count_requests(store, "tiny") == 21
    window = log.window(WINDOW_START, WINDOW_START + HOUR)
    signals = window_signals("tiny", window, WINDOW_START, WINDOW_START + HOUR)
    assert signals.requests == 13 and signals.arms["production"].requests == 11
    unrouted = signals.arms["unrouted"]  # the pinned line, and the request turned away before routing
    assert unrouted.requests == 2 and unrouted.busy_rate.events == 1 and unrouted.completed == 1
    assert signals.arms["production"].fallback_rate.events == 0  # a line without the field did not fall back
    assert read_log(store, "never-served").entries == [] and count_requests(store, "never-served") == 0
    assert as_json_lines(inside).count("\n") == 10
