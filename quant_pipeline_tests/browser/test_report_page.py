"""The audit's HTML evidence opened as a reviewer opens it, from disk: `delta_report.html` (one evaluation) and
`audit_report.html` (every release event of the model).

A reviewer handed only the file must be able to say which exact artifact was judged, by what rule, and which
slices failed; a failing row that is in the record but not on the page is the failure these tests exist for.
"""

from pathlib import Path

import pytest
from playwright.sync_api import expect


@pytest.fixture
def delta_page(failed_audit, page):
    page.goto(Path(failed_audit.delta_html).as_uri())
    return page


def test_delta_report_shows_the_verdict_and_which_artifact_was_judged(failed_audit, delta_page, screenshot):
    page = delta_page
    expect(page.locator("#verdict")).to_be_visible()
    expect(page.locator("#verdict")).to_contain_text(failed_audit.verdict)
    identity = page.locator("#identity")
    expect(identity).to_be_visible()
    expect(identity.locator("th").first).to_be_visible()  # field names, not a bare list of values
    expect(identity).to_contain_text(failed_audit.artifact_id)  # in full: the ID a reviewer looks up
    expect(identity).to_contain_text(failed_audit.content_hash)  # in full, not a 12-character prefix
    expect(identity).to_contain_text(failed_audit.model_name)
    expect(page.locator("#rules")).to_be_visible()
    expect(page.locator("#rules")).to_contain_text("tolerance")
    screenshot()


def test_delta_report_shows_every_failing_slice_and_no_other_as_a_regression(failed_audit, delta_page, screenshot):
    """One `status-regression` row per failing metric x slice of the record, each visible, and no more."""
    page = delta_page
    regressions = page.locator("#slices tr.status-regression")
    expect(regressions).to_have_count(len(failed_audit.failing))
    for f in failed_audit.failing:
        row = regressions.and_(page.locator(f'[data-metric="{f["metric"]}"][data-slice="{f["category"]}"]'))
        expect(row, f"failing {f['metric']}/{f['category']} has no regression row").to_be_visible()
        expect(row).to_contain_text(f["metric"])
        expect(row).to_contain_text(f["category"])
    screenshot()


def test_audit_report_has_a_section_per_evaluated_artifact_with_its_decision(failed_audit, page, screenshot):
    """The per-model report: this model had one artifact evaluated, rejected by the gate after its FAIL."""
    page.goto(Path(failed_audit.audit_html).as_uri())
    audits = page.locator("section.audit")
    expect(audits).to_have_count(1)
    expect(audits.first).to_contain_text(failed_audit.artifact_id)
    expect(audits.first).to_contain_text(failed_audit.verdict)
    decision = audits.first.locator(".decision")
    expect(decision).to_be_visible()
    expect(decision).to_contain_text("rejected")
    screenshot()
