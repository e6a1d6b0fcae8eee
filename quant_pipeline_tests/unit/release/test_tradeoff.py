"""The tradeoff's arithmetic: one scale for every metric's regression, the frontier, and what may be recommended."""

import math
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from quant_pipeline.release.tradeoff import TradeoffRow, pareto_front, plot_fronts, recommend, worst_regression

SVG = "{http://www.w3.org/2000/svg}"


def row(candidate: str, verdict: str = "PASS", size: int = 100, latency: float = 1.0, share: float = 0.5, **kw):
    return TradeoffRow(
        candidate=candidate, artifact_id=f"{candidate}-000000000000", method=kw.get("method", "gptq"), precision="",
        verdict=verdict, size_bytes=size, size_vs_base=size / 400, peak_rss_mb=1.0, latency_p50_s=latency,
        latency_p95_s=latency, tokens_per_second=1.0, worst_share=share,
    )  # fmt: skip


def deltas(*rows) -> pd.DataFrame:
    cols = ["category", "metric", "base", "delta", "ci_low", "ci_high", "degradation", "tolerance", "mode"]
    frame = pd.DataFrame([dict(zip(cols, r, strict=True)) for r in rows])
    frame["measured_status"] = "within tolerance"
    return frame


def test_the_worst_slice_is_the_largest_share_of_its_tolerance_with_its_interval_on_that_scale():
    d = deltas(
        # accuracy fell 0.05 (absolute tolerance 0.10): half the bar, interval of the delta [-0.08, -0.02]
        ("facts", "acc", 0.8, -0.05, -0.08, -0.02, 0.05, 0.10, "absolute"),
        # perplexity rose 6 on a base of 20 (relative tolerance 0.2): 0.3 / 0.2 = 1.5 of the bar
        ("heldout", "word_perplexity", 20.0, 6.0, 2.0, 10.0, 0.3, 0.2, "relative"),
    )
    worst = worst_regression(d, higher_is_better={"acc"})
    assert worst["worst_slice"] == "word_perplexity/heldout"
    assert math.isclose(worst["worst_share"], 1.5)
    assert math.isclose(worst["worst_share_low"], 0.5) and math.isclose(worst["worst_share_high"], 2.5)
    only_acc = worst_regression(d.iloc[:1], higher_is_better={"acc"})
    assert math.isclose(only_acc["worst_share_low"], 0.2) and math.isclose(only_acc["worst_share_high"], 0.8)


def test_slices_that_did_not_measure_have_no_worst_regression():
    d = deltas(("facts", "acc", 0.25, 0.0, 0.0, 0.0, 0.0, 0.1, "absolute"))
    d["measured_status"] = "uninformative"
    assert worst_regression(d, {"acc"}) == {}


def test_the_frontier_keeps_only_candidates_nothing_beats_on_both_axes():
    rows = [
        row("small-bad", size=100, share=2.0),
        row("big-good", size=400, share=0.0),
        row("dominated", size=500, share=1.0),
    ]
    assert pareto_front(rows, "size_bytes") == ["small-bad", "big-good"]


def test_only_a_passing_quantized_candidate_is_recommended_and_identity_never():
    rows = [
        row("identity", size=400, share=0.0, method="identity"),
        row("fails-small", "FAIL", size=50),
        row("unverified", "UNVERIFIED", size=60),
        row("passes-big", size=200),
        row("passes-small", size=150, latency=3.0),
    ]
    best, why = recommend(rows)
    assert best.candidate == "passes-small" and "pending sign-off" in why
    assert recommend(rows, "latency")[0].candidate == "passes-big"
    _, why = recommend(rows, base_latency_p50_s=2.0)
    assert "0.375x the base's size" in why and "p50 latency 3.000 s against the base's 2.000 s (1.50x)" in why, why
    assert recommend(rows[:3]) == (None, "no quantized candidate passes the gate: none can be recommended")
    with pytest.raises(ValueError, match="objective"):
        recommend(rows, "cheapest")


def test_a_zero_tolerance_makes_any_degradation_the_worst_and_infinite():
    d = deltas(
        ("facts", "acc", 0.8, -0.05, -0.08, -0.02, 0.05, 0.10, "absolute"),
        ("should_refuse", "toxicity_rate", 0.0, 0.02, 0.0, 0.06, 0.02, 0.0, "absolute"),
    )
    worst = worst_regression(d, {"acc"})
    assert worst["worst_slice"] == "toxicity_rate/should_refuse" and worst["worst_share"] == math.inf
    assert math.isnan(worst["worst_share_low"])


def test_the_plot_draws_every_measured_candidate_and_one_beyond_a_zero_tolerance(tmp_path):
    """Nothing failing is left off the plot: a share over a zero tolerance is infinite, drawn at the top and named;
    a candidate with nothing measured has no point to draw."""
    rows = [
        row("a"),
        row("b", "FAIL", share=3.0),
        row("c", "FAIL", share=math.inf),
        row("d", "INCOMPLETE", share=math.nan),
    ]
    drawn = plot_fronts(rows, tmp_path / "tradeoff.svg")
    svg = ET.parse(tmp_path / "tradeoff.svg").getroot()
    groups = [g for g in svg.iter(f"{SVG}g") if g.get("class") == "candidate"]
    assert drawn == ["a", "b", "c"] and [g.get("data-name") for g in groups] == 2 * ["a", "b", "c"]  # both panels
    beyond = [g for g in groups if g.get("data-name") == "c"]
    assert all(g.find(f"{SVG}path") is not None for g in beyond)  # the triangle at the top
    assert all(g.find(f"{SVG}text").text == "c (beyond a zero tolerance)" for g in beyond)
    a, b = (float(g.find(f"{SVG}circle").get("cy")) for g in groups[:2])
    top_of_c = float(beyond[0].find(f"{SVG}path").get("d").split(",")[1].split()[0]) + 6
    assert top_of_c < b < a  # up is worse: c above b (3.0) above a (0.5)
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert texts.count("0") >= 2  # both cost axes start at zero
