"""The audit documents a reviewer accepts as evidence: the per-audit delta report and the per-model report.

Real deltas (`compute_deltas` on per-item tables) are rendered and the HTML is parsed, as a browser test
would read it: by the ids and classes the modules document.
"""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import pandas as pd
import pytest

from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.defs.gate import SHOWN_COLUMNS
from quant_pipeline.evaluation.delta import REGRESSION, compute_deltas, verdict
from quant_pipeline.evaluation.delta_html import render_html, render_markdown
from quant_pipeline.evaluation.plots import tolerance_offset
from quant_pipeline.evaluation.policy import load_policy
from quant_pipeline.evaluation.report_context import DecisionNote, ReportContext
from quant_pipeline.release.report import render
from quant_pipeline.release.trail import append_entry
from quant_pipeline_tests.tables import items_table, results_table

POLICY = """name: reviewer-test <b>policy</b>
min_items: 20
tolerances:
  acc: {direction: higher_is_better, mode: absolute, tolerance: 0.08}
  word_perplexity: {direction: lower_is_better, mode: relative, tolerance: 0.20}
  bits_per_byte: {direction: lower_is_better, mode: relative, tolerance: 0.05}
"""
HASHES = {k: f"{i:x}" * 64 for i, k in enumerate(("content_hash", "base_hash", "calibration_hash", "runtime_hash"), 1)}
HOSTILE = "<script>alert('x')</script>"
VOID = {"img", "meta", "br", "hr", "input", "link"}


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], []

    def all_text(self) -> str:
        return "".join(t if isinstance(t, str) else t.all_text() for t in self.text)

    def find(self, tag: str | None = None, id: str | None = None, cls: str | None = None) -> list[Node]:
        found = []
        for c in self.children:
            if (
                (tag is None or c.tag == tag)
                and (id is None or c.attrs.get("id") == id)
                and (cls is None or cls in (c.attrs.get("class") or "").split())
            ):
                found.append(c)
            found += c.find(tag, id, cls)
        return found


class Tree(HTMLParser):
    """A minimal DOM: enough to find elements by id, class and tag, and read their text."""

    def __init__(self, page: str):
        super().__init__()
        self.root = Node("root", {})
        self.stack = [self.root]
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        self.stack[-1].text.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        if tag not in VOID:
            assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
            self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].text.append(data)


def one(root: Node, **how) -> Node:
    found = root.find(**how)
    assert len(found) == 1, (how, len(found))
    return found[0]


def identity(table: Node) -> dict[str, str]:
    return {one(tr, tag="th").all_text(): one(tr, tag="td").all_text() for tr in table.find(tag="tr")}


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("policy") / "policy.yaml"
    path.write_text(POLICY)
    return path


@pytest.fixture(scope="module")
def judged(policy_file):
    """A FAIL: accuracy collapsed on facts (with an interval), regressed on science within noise (interval
    reaching zero), held on reading, too few items on arithmetic, and the whole-text perplexity and bits per
    byte regressed with no per-item values at all; latency is reported, not gated."""
    policy, policy_hash = load_policy(policy_file)
    per_item_base = {
        ("facts", "acc"): [1.0] * 36 + [0.0] * 4,
        ("science", "acc"): [1.0] * 15 + [0.0] * 5,
        ("reading", "acc"): [1.0] * 32 + [0.0] * 8,
        ("arithmetic", "acc"): [1.0] * 4 + [0.0] * 1,
    }
    per_item_quant = {
        ("facts", "acc"): [1.0] * 24 + [0.0] * 16,
        ("science", "acc"): [1.0] * 9 + [0.0] * 6 + [1.0] * 3 + [0.0] * 2,  # 6 lost, 3 gained: -0.15
        ("reading", "acc"): [1.0] * 31 + [0.0] * 9,
        ("arithmetic", "acc"): [1.0] * 2 + [0.0] * 3,
    }
    mean = {k: sum(v) / len(v) for k, v in per_item_base.items()}
    qmean = {k: sum(v) / len(v) for k, v in per_item_quant.items()}
    base = results_table({**mean, ("heldout", "word_perplexity"): 20.0, ("heldout", "bits_per_byte"): 1.0,
                   ("cost", "latency_p50_s"): 2.0})  # fmt: skip
    quant = results_table({**qmean, ("heldout", "word_perplexity"): 30.0, ("heldout", "bits_per_byte"): 1.2,
                    ("cost", "latency_p50_s"): 1.3})  # fmt: skip
    deltas = compute_deltas(base, quant, policy, items_table(per_item_base), items_table(per_item_quant))
    outcome, reasons = verdict(deltas, policy)
    ctx = ReportContext(
        model_name="SmolLM2 " + HOSTILE, artifact_id="gptq-w4g64-0123abcd", registry_version="3",
        recipe={"method": "gptq", "bits": 4, "group_size": 64}, calibration_count=64, policy_name=policy.name,
        policy_hash=policy_hash, policy=policy, base_eval_key="base-eval-1", eval_key="quant-eval-1",
        judged_at="2026-11-26T08:00:00+00:00", verdict=outcome, reasons=reasons, **HASHES,
    )  # fmt: skip
    page = render_html(deltas, ctx, base, quant, {"base_mb": 516.5, "quantized_mb": 166.8})
    return deltas, ctx, page, Tree(page).root


def test_the_verdict_is_a_prominent_banner_that_names_the_model_and_artifact(judged):
    deltas, ctx, _, root = judged
    assert ctx.verdict == "FAIL"
    banner = one(root, id="verdict")
    assert "verdict-fail" in banner.attrs["class"].split()
    text = banner.all_text()
    assert text.startswith("FAIL — SmolLM2 ") and ctx.artifact_id in text
    assert f"{(deltas['status'] == REGRESSION).sum()} regressed beyond tolerance" in text


def test_the_identity_table_carries_every_hash_in_full_and_the_pending_decision(judged):
    _, ctx, _, root = judged
    fields = identity(one(root, id="identity"))
    assert fields["Artifact content hash (sha256)"] == HASHES["content_hash"]
    assert fields["Base model content hash (sha256)"] == HASHES["base_hash"]
    assert fields["Calibration samples used (sha256)"] == HASHES["calibration_hash"]
    assert fields["Runtime fingerprint (sha256)"] == HASHES["runtime_hash"]
    assert fields["Policy hash (sha256)"] == ctx.policy_hash and len(ctx.policy_hash) == 64
    assert fields["Artifact ID"] == ctx.artifact_id and fields["Verdict"] == "FAIL"
    assert '"bits": 4' in fields["Recipe"] and fields["Calibration samples"] == "64"
    assert fields["Decision"] == "pending sign-off"
    assert "pending sign-off" in one(root, id="decision").all_text()


def test_every_failing_row_is_in_the_report_even_without_an_interval(judged):
    deltas, _, _, root = judged
    failing = {(r.metric, r.category) for r in deltas.itertuples() if r.status == REGRESSION}
    assert {("word_perplexity", "heldout"), ("bits_per_byte", "heldout"), ("acc", "facts")} <= failing
    assert math.isnan(deltas.set_index(["metric", "category"]).loc[("word_perplexity", "heldout"), "ci_low"])
    rows = one(root, id="slices").find(tag="tr", cls="status-regression")
    assert {(r.attrs["data-metric"], r.attrs["data-slice"]) for r in rows} == failing
    panels = {img.attrs["alt"] for img in one(root, id="plots").find(tag="img", cls="delta-panel")}
    assert panels == {f"deltas of {m} per slice" for m in set(deltas["metric"])}  # one panel per metric, none dropped


def test_failing_rows_come_first(judged):
    _, _, _, root = judged
    statuses = [tr.attrs["class"] for tr in one(root, id="slices").find(tag="tbody")[0].find(tag="tr")]
    first_other = next(i for i, s in enumerate(statuses) if s != "status-regression")
    assert all(s != "status-regression" for s in statuses[first_other:])
    assert statuses[-1] == "status-ungated"


def test_numbers_are_formatted_by_kind_and_nothing_reads_nan(judged):
    _, _, _, root = judged
    table = one(root, id="slices")
    cells = {
        (tr.attrs["data-metric"], tr.attrs["data-slice"]): [td.all_text() for td in tr.find(tag="td")]
        for tr in table.find(tag="tbody")[0].find(tag="tr")
    }
    status, metric, _, items, base, quant, delta, tolerance, _ = cells[("acc", "facts")]
    assert (items, base, quant) == ("40", "90.0%", "60.0%") and delta.startswith("-30.0 pp [")
    assert tolerance == "may fall ≤ 8 pp" and status == REGRESSION
    _, _, _, items, base, quant, delta, tolerance, _ = cells[("word_perplexity", "heldout")]
    assert (items, base, quant, delta) == ("–", "20.00", "30.00", "+10.00")  # no interval: the point alone
    assert tolerance == "may rise ≤ 20% of base"
    assert cells[("latency_p50_s", "cost")][0] == "reported (no tolerance)"
    text = root.all_text()
    assert not re.search(r"\bnan\b", text, re.IGNORECASE) and "50.0000" not in text and "passed" not in text.lower()


def test_a_regression_whose_interval_includes_zero_says_the_rule_judges_the_point_estimate(judged):
    deltas, _, _, root = judged
    science = deltas.set_index(["metric", "category"]).loc[("acc", "science")]
    assert science["status"] == REGRESSION and science["ci_low"] < 0 < science["ci_high"]
    row = next(tr for tr in one(root, id="slices").find(tag="tr") if tr.attrs.get("data-slice") == "science")
    assert "the rule judges the point estimate" in row.all_text()
    rules = one(root, id="rules").all_text()
    assert "point estimate" in rules and "even when its 95% paired bootstrap interval includes zero" in rules
    for word in ("Not measurable", "Uninformative", "Waived", "Reported (no tolerance)", "relative"):
        assert word in rules


def test_the_policy_section_lists_its_full_hash_and_tolerances(judged):
    _, ctx, _, root = judged
    section = one(root, id="policy")
    assert ctx.policy_hash in section.all_text() and "reviewer-test <b>policy</b>" in section.all_text()
    assert len(section.find(tag="tbody")[0].find(tag="tr")) == 3


def test_user_text_renders_as_text_not_markup(judged, policy_file):
    deltas, ctx, page, root = judged
    assert "<script" not in page.lower() and "<b>policy" not in page
    assert "&lt;script&gt;" in page and HOSTILE in one(root, tag="h1").all_text()
    decided = ctx.model_copy(
        update={"decisions": [DecisionNote(event="approved", by="Eve <img src=x>", at="2026-11-26", note=HOSTILE)]}
    )
    empty = pd.DataFrame(columns=["category", "metric", "value"])
    page = render_html(deltas, decided, empty, empty, {"base_mb": 1.0, "quantized_mb": 0.5})
    assert "<script" not in page.lower() and "<img src=x>" not in page
    assert HOSTILE in one(Tree(page).root, id="decision").all_text()


def test_the_markdown_keeps_the_verdict_and_gains_the_full_hashes(judged):
    deltas, ctx, _, _ = judged
    md = render_markdown(deltas, ctx.policy, ctx.policy_hash, ctx.artifact_id, ctx.verdict, ctx.reasons, ctx)
    assert "**FAIL**" in md and HASHES["content_hash"] in md and HASHES["base_hash"] in md
    assert "| heldout | word_perplexity | – | 20.00 | 30.00 | +10.00 |" in md and "nan" not in md


def test_tolerance_marks_sit_on_the_side_of_a_degradation_and_scale_with_the_base_when_relative():
    assert tolerance_offset("acc", 0.08, "absolute", 0.9) == pytest.approx(-0.08)
    assert tolerance_offset("word_perplexity", 0.2, "relative", 20.0) == pytest.approx(4.0)
    assert math.isnan(tolerance_offset("latency_p50_s", math.nan, "", 2.0))


class _NoAliases:
    def alias_version(self, model_name, alias):
        return None


def test_the_model_report_shows_each_evaluation_with_its_identity_slices_and_the_decision_that_followed(
    judged, policy_file, tmp_path
):
    deltas, ctx, _, _ = judged
    store = ArtifactStore(tmp_path / "store")
    copy = store.policy_path(ctx.policy_hash)
    copy.parent.mkdir(parents=True)
    copy.write_bytes(policy_file.read_bytes())
    trail, name = store.trail_path("SmolLM2"), "SmolLM2"
    gated = deltas[deltas["status"] != "reported (no tolerance)"]
    records = gated[list(SHOWN_COLUMNS)].to_dict("records")
    for aid, decision in (("gptq-a", {"event": "rejected", "by": "the gate", "note": "acc/facts regressed"}),
                          ("gptq-b", {"event": "approved", "by": "Ada", "note": HOSTILE})):  # fmt: skip
        append_entry(trail, {"event": "audit", "artifact_id": aid, "recipe": {"bits": 4}, **HASHES})
        append_entry(trail, {
            "event": "evaluated", "artifact_id": aid, "verdict": "FAIL", "reasons": ctx.reasons,
            "policy_name": ctx.policy_name, "policy_hash": ctx.policy_hash, "report_key": "k", "deltas": records,
        })  # fmt: skip
        append_entry(trail, {"event": "pending sign-off", "artifact_id": aid, "by": None})
        append_entry(trail, {"artifact_id": aid, **decision})
    markdown, page = render(store, _NoAliases(), name)
    assert "Trail integrity: intact" in markdown and "<script" not in page.lower()
    root = Tree(page).root
    assert "integrity-intact" in one(root, id="integrity").attrs["class"]
    sections = root.find(tag="section", cls="audit")
    assert [s.attrs["id"] for s in sections] == ["audit-5", "audit-1"]  # newest first
    for section, aid, who, note in ((sections[0], "gptq-b", "Ada", HOSTILE), (sections[1], "gptq-a", "the gate", "")):
        fields = identity(one(section, tag="table", cls="identity"))
        assert fields["Artifact ID"] == aid and fields["Artifact content hash (sha256)"] == HASHES["content_hash"]
        assert fields["Policy hash (sha256)"] == ctx.policy_hash
        decision = one(section, cls="decision").all_text()
        assert who in decision and note in decision and "pending sign-off" in decision
        assert fields["Decision"].startswith(("approved by Ada", "rejected by the gate"))
        failing = one(section, tag="table", cls="slices").find(tag="tr", cls="status-regression")
        assert len(failing) == (gated["status"] == REGRESSION).sum()
        counted = gated[(gated["status"] == REGRESSION) & (gated["n_items"] > 0)]  # perplexity rows have no items
        shown = [row.find(tag="td")[3].all_text().strip() for row in failing]
        expected = sorted(str(int(n)) for n in counted["n_items"])
        assert expected and sorted(s for s in shown if s.isdigit()) == expected  # the paired counts, from the trail
        assert "may rise ≤ 20% of base" in one(section, tag="table", cls="slices").all_text()  # mode: the pinned copy
    assert len(one(root, id="events").find(tag="tbody")[0].find(tag="tr")) == 8


def test_a_model_report_whose_policy_copy_is_gone_does_not_guess_the_tolerance_mode(judged, tmp_path):
    deltas, ctx, _, _ = judged
    store = ArtifactStore(tmp_path / "store")
    records = deltas[deltas["metric"] == "word_perplexity"][list(SHOWN_COLUMNS)].to_dict("records")
    append_entry(store.trail_path("m"), {
        "event": "evaluated", "artifact_id": "a", "verdict": "FAIL", "policy_name": ctx.policy_name,
        "policy_hash": ctx.policy_hash, "report_key": "k", "deltas": records,
    })  # fmt: skip
    _, page = render(store, _NoAliases(), "m")
    section = one(Tree(page).root, tag="section", cls="audit")
    assert "0.2 (mode not recorded)" in one(section, tag="table", cls="slices").all_text()
    assert "could not be read back" in one(section, tag="section", cls="policy").all_text()
    assert identity(one(section, tag="table", cls="identity"))["Decision"] == "pending sign-off"


def test_a_re_audit_that_judges_the_same_report_again_is_shown_once_with_every_decision_since_the_first(
    judged, tmp_path
):
    deltas, ctx, _, _ = judged
    store = ArtifactStore(tmp_path / "store")
    records = deltas[deltas["metric"] == "word_perplexity"][list(SHOWN_COLUMNS)].to_dict("records")
    judgement = {
        "event": "evaluated", "artifact_id": "a", "verdict": "FAIL", "policy_name": ctx.policy_name,
        "policy_hash": ctx.policy_hash, "report_key": "k", "deltas": records, "report_sha256": "1" * 64,
    }  # fmt: skip
    trail = store.trail_path("m")
    append_entry(trail, judgement)  # 0
    append_entry(trail, {"event": "rejected", "artifact_id": "a", "by": "Ada", "note": "first look"})  # 1
    append_entry(trail, judgement)  # 2: a re-audit that reused everything
    append_entry(trail, {**judgement, "report_sha256": "2" * 64})  # 3: another report (say, a new policy)
    append_entry(trail, {**judgement, "report_sha256": "2" * 64})  # 4
    _, page = render(store, _NoAliases(), "m")
    sections = Tree(page).root.find(tag="section", cls="audit")
    assert [s.attrs["id"] for s in sections] == ["audit-4", "audit-2"]  # one per distinct judgement, newest first
    assert "judged before at trail entries 3" in sections[0].all_text()
    assert "judged before at trail entries 0" in sections[1].all_text()
    assert "Ada" in one(sections[1], cls="decision").all_text()  # the decision after the first of the run is kept
