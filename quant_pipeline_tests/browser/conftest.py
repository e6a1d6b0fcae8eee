"""A real browser on the audit record: Debian's chromium driven by Playwright, and one failing audit shared by
every browser test.

Why a browser at all: the record a reviewer reads is what the Dagster UI, the MLflow UI and the HTML reports
render, not what their APIs return; a check whose values never reach the page, or a report that hides a
failing slice, only shows up here. Playwright's own browser download needs a host these machines cannot
reach, so `make install` puts Debian's chromium in place and Playwright is pointed at it.

The audit is FAIL on purpose (a policy no quantization can meet), so the pages must show a failure and its
values. It runs once per session: under pytest-xdist the first worker to ask runs it into a folder shared by
the workers, under a file lock, and the others read its summary (each tiny audit costs ~40 s here).
"""

import fcntl
import json
import os
import re
import shutil
from pathlib import Path

import pytest

from quant_pipeline_tests.browser.failing_audit import FailedAudit, run_failing_audit
from quant_pipeline_tests.servers import REPO_ROOT


@pytest.fixture(scope="session", autouse=True)
def chromium() -> str:
    """Debian's chromium, or every browser test FAILS (never skips: a skipped browser suite reads as a green one),
    first thing, before an audit is spent on a test that cannot open a page."""
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail("chromium not found (the browser tests drive Debian's chromium): run `make install`", pytrace=False)
    return path


# No sandbox (root in CI); and no background traffic: this machine's closed network refuses Chromium's update,
# sync and lookup connections, many at a time, which slows every start.
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="session")
def browser(chromium):
    """One headless chromium for the session (a launch costs ~1 s; a page per test keeps tests apart)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        # --no-sandbox: CI runs as root in a container, where chromium's sandbox cannot start
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so the `page` fixture knows at teardown whether the test failed."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def page(browser, request, artifacts_dir):
    """A fresh browser context per test; when the test fails, what the page showed is saved as `<test>-failed.png`
    (the assertion's own screenshot is never reached then, and this is what a CI failure is read off)."""
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    yield page
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        page.screenshot(path=str(artifacts_dir / f"{_file_name(request.node.name)}-failed.png"), full_page=True)
    context.close()


def _file_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where screenshots go: $QP_TEST_ARTIFACTS, else <repo>/test-artifacts/screenshots (gitignored)."""
    path = Path(os.environ.get("QP_TEST_ARTIFACTS") or REPO_ROOT / "test-artifacts" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def screenshot(page, request, artifacts_dir):
    """`screenshot(label)`: a full-page PNG named after the test (and the label), one per page asserted, taken
    once its assertions pass: a CI run's artifacts then show what each pinned page looked like."""

    def take(label: str = "") -> Path:
        name = _file_name(request.node.name + (f"-{label}" if label else ""))
        path = artifacts_dir / f"{name}.png"
        page.screenshot(path=str(path), full_page=True)
        return path

    return take


@pytest.fixture(scope="session")
def failed_audit(tmp_path_factory, worker_id, request) -> FailedAudit:
    """The failing audit, run once per test session (once for all xdist workers, under a file lock)."""
    shared = tmp_path_factory.getbasetemp() if worker_id == "master" else tmp_path_factory.getbasetemp().parent
    root, summary = shared / "browser_audit", shared / "browser_audit.json"
    with open(shared / "browser_audit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the audit fails
        if summary.exists():
            return FailedAudit(**json.loads(summary.read_text()))
        if root.exists():  # a worker whose audit failed left it half-done: start again
            shutil.rmtree(root)
        root.mkdir()
        audit = run_failing_audit(root, request.getfixturevalue("tiny_llama"))
        summary.write_text(json.dumps(audit.__dict__))
        return audit
