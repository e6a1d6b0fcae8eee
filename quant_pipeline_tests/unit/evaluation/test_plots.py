"""The report's plots say what the table says: every slice drawn, the bar where the policy puts it, costs from zero.

The panels are SVG, parsed here as XML: each row's position is read back through the axis's own tick labels, so
a point or a bar drawn in the wrong place fails, not only a missing one.
"""

import math
import re
import xml.etree.ElementTree as ET

import pandas as pd
import pytest

from quant_pipeline.evaluation.delta import REGRESSION, UNGATED, WITHIN
from quant_pipeline.evaluation.plots import STATUS_CLASS, STATUS_COLOURS, cost_quality, delta_panels, ticks
from quant_pipeline.evaluation.report_context import CostPoint

SVG = "{http://www.w3.org/2000/svg}"
HOSTILE = "<script>alert('x')</script>"
NAN = math.nan
ROWS = pd.DataFrame(
    [  # category, metric, base, delta, ci_low, ci_high, tolerance, mode, status
        ("facts", "acc", 0.90, -0.30, -0.45, -0.15, 0.08, "absolute", REGRESSION),
        ("reading", "acc", 0.80, -0.02, -0.10, 0.05, 0.08, "absolute", WITHIN),
        (HOSTILE, "acc", 0.50, 0.00, -0.05, 0.05, 0.08, "absolute", WITHIN),
        ("heldout", "word_perplexity", 20.0, 10.0, NAN, NAN, 0.20, "relative", REGRESSION),
        ("cost", "latency_p50_s", 2.0, -0.7, NAN, NAN, NAN, "", UNGATED),
    ],
    columns=["category", "metric", "base", "delta", "ci_low", "ci_high", "tolerance", "mode", "status"],
)


def panels() -> dict[str, ET.Element]:
    return {metric: ET.fromstring(svg) for metric, svg in delta_panels(ROWS)}  # well-formed XML, or this raises


def axis(svg: ET.Element):
    """Value → x, read back from the tick labels under the axis (two of them fix the scale)."""
    labels = [
        t for t in svg.iter(f"{SVG}text") if t.get("text-anchor") == "middle" and re.fullmatch(r"-?[\d.e-]+", t.text)
    ]
    (v1, x1), (v2, x2) = [(float(t.text), float(t.get("x"))) for t in (labels[0], labels[-1])]
    return lambda value: x1 + (value - v1) * (x2 - x1) / (v2 - v1)


def rows(svg: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-slice"): g for g in svg.iter(f"{SVG}g") if "row" in g.get("class", "").split()}


def test_every_slice_is_a_row_of_its_metrics_panel_coloured_by_status_even_without_an_interval():
    drawn = panels()
    assert set(drawn) == set(ROWS["metric"])  # one panel per metric, none dropped
    for metric, svg in drawn.items():
        expected = ROWS[ROWS["metric"] == metric]
        assert set(rows(svg)) == set(expected["category"])
        for r in expected.itertuples():
            row = rows(svg)[r.category]
            assert row.get("class").split() == ["row", STATUS_CLASS[r.status]]
            point = row.find(f"{SVG}circle")
            assert point.get("stroke") == STATUS_COLOURS[r.status]
            has_ci = not math.isnan(r.ci_low)
            assert point.get("fill") == (STATUS_COLOURS[r.status] if has_ci else "white")  # hollow: no interval
            assert str(r.category) in row.find(f"{SVG}title").text and r.status in row.find(f"{SVG}title").text
    perplexity = rows(drawn["word_perplexity"])["heldout"]
    assert perplexity.find(f"{SVG}circle") is not None  # a failing whole-text row without an interval is drawn


def test_points_intervals_and_the_bar_lie_where_their_values_are_on_the_axis():
    acc = panels()["acc"]
    x = axis(acc)
    facts = rows(acc)["facts"]
    assert float(facts.find(f"{SVG}circle").get("cx")) == pytest.approx(x(-30.0), abs=0.2)  # percentage points
    interval, bar = facts.findall(f"{SVG}line")
    assert (float(interval.get("x1")), float(interval.get("x2"))) == pytest.approx((x(-45.0), x(-15.0)), abs=0.2)
    assert bar.get("stroke-dasharray") and float(bar.get("x1")) == pytest.approx(x(-8.0), abs=0.2)  # higher is better
    perplexity = panels()["word_perplexity"]
    heldout = rows(perplexity)["heldout"]
    bar = heldout.find(f"{SVG}line")  # relative: 20% of a base of 20, above zero for lower-is-better
    assert float(bar.get("x1")) == pytest.approx(axis(perplexity)(4.0), abs=0.2)
    assert rows(panels()["latency_p50_s"])["cost"].find(f"{SVG}line") is None  # ungated: no bar drawn


def test_slice_names_are_text_in_the_svg_never_markup():
    acc = panels()["acc"]
    assert not list(acc.iter(f"{SVG}script"))
    assert HOSTILE in [t.text for t in acc.iter(f"{SVG}text")]


def test_cost_axes_start_at_zero_and_a_model_not_measured_is_named():
    points = [
        CostPoint(name="base", size_mb=516.5, latency_s=2.0, quality=0.5),
        CostPoint(name="gptq", size_mb=166.8, latency_s=1.3, quality=0.45),
        CostPoint(name="hqq", size_mb=NAN, latency_s=1.1, quality=0.4),
    ]
    svg = ET.fromstring(cost_quality(points))
    texts = [t.text for t in svg.iter(f"{SVG}text")]
    assert texts.count("0") == 4 and texts.count("100") == 2  # both cost axes from 0; quality 0-100 on both
    assert "not measured: hqq" in texts
    drawn = [g.get("data-name") for g in svg.iter(f"{SVG}g") if g.get("class") == "point"]
    assert drawn == ["base", "gptq", "base", "gptq", "hqq"]


def test_ticks_are_round_values_spanning_the_range():
    assert ticks(-0.0016, 0.0001) == [-0.0015, -0.001, -0.0005, 0.0]
    assert ticks(0.0, 100.0) == [0.0, 50.0, 100.0]
    assert ticks(-47.0, 3.0) == [-40.0, -20.0, 0.0]
