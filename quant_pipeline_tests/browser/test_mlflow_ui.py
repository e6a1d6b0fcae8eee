"""The failing audit as an analyst sees it in the MLflow UI (`mlflow server`, what `make mlflow` serves).

MLflow is the system of record: a stage run per stage, and the registry version that says what the artifact
is and how it was judged. A FAIL must read as a FAIL there too, not only in Dagster.
"""

import sys
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from playwright.sync_api import expect

from quant_pipeline_tests.browser.failing_audit import POLICY_NAME
from quant_pipeline_tests.servers import free_port, start_server, stop_process_group, wait_until

BIN_DIR = Path(sys.executable).parent
STAGES = ["base_checkpoint", "quantized_artifact", "quantized_eval_results", "delta_report", "approval"]
UI_TIMEOUT = 30_000  # ms
# MLflow 3.17 opens an experiment in its GenAI view unless told otherwise (the sidebar switch or this parameter)
ML_VIEW = "workflowType=machine_learning"


def healthy(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status == 200


@pytest.fixture(scope="module")
def mlflow_ui(failed_audit, tmp_path_factory):
    """`mlflow server` on the audit's SQLite store and artifacts (as `make mlflow` runs it), on loopback."""
    root = Path(failed_audit.root)
    port, log = free_port(), tmp_path_factory.mktemp("mlflow_ui") / "mlflow_server.log"
    cmd = [
        str(BIN_DIR / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--default-artifact-root", str(root / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    proc = start_server(cmd, log, failed_audit.settings_env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: healthy(f"{url}/health"), timeout=120, interval=1, proc=proc, log=log)
        yield url
    finally:
        stop_process_group(proc)


def test_experiment_page_lists_a_run_for_every_stage(failed_audit, mlflow_ui, page, screenshot):
    exp = MlflowClient(tracking_uri=mlflow_ui).get_experiment_by_name(f"quant_pipeline/{failed_audit.model_name}")
    assert exp is not None
    page.goto(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs?{ML_VIEW}")
    expect(page.locator('a[href*="/runs/"]').first).to_be_visible(timeout=UI_TIMEOUT)  # the table's first run
    # stage runs nested under an audit's parent run are folded under it: unfold every parent once
    expanders = page.locator('button[data-component-id*="runnamecellrenderer"]')
    for i in range(expanders.count()):
        expanders.nth(i).click()
    for stage in STAGES:
        expect(page.get_by_role("link", name=stage, exact=True).first).to_be_visible(timeout=UI_TIMEOUT)
    screenshot("runs")


def test_models_page_lists_the_registered_model_and_its_versions(failed_audit, mlflow_ui, page, screenshot):
    name, version = failed_audit.model_name, failed_audit.registry_version
    page.goto(f"{mlflow_ui}/#/models")
    expect(page.get_by_role("link", name=name, exact=True)).to_be_visible(timeout=UI_TIMEOUT)
    expect(page.get_by_text(f"Version {version}", exact=True).first).to_be_visible()
    screenshot("models")

    page.goto(f"{mlflow_ui}/#/models/{name}")
    expect(page.get_by_role("link", name="Version 1", exact=True)).to_be_visible(timeout=UI_TIMEOUT)  # the base
    candidate = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
    expect(candidate).to_be_visible()
    expect(candidate).to_contain_text(failed_audit.artifact_id)  # the version row says which artifact it holds
    screenshot("model")


def test_version_page_shows_the_artifact_its_verdict_and_its_description(failed_audit, mlflow_ui, page, screenshot):
    """The version a reviewer opens from a link: its artifact ID, its FAIL verdict, and (#16) a description that
    says what it is and how it was judged, shown as the version's description rather than left empty."""
    name, version = failed_audit.model_name, failed_audit.registry_version
    page.goto(f"{mlflow_ui}/#/models/{name}/versions/{version}")
    tags = page.locator("tr", has=page.get_by_text("verdict", exact=True))
    expect(tags).to_contain_text(failed_audit.verdict, timeout=UI_TIMEOUT)
    expect(page.get_by_text(failed_audit.artifact_id, exact=True).first).to_be_visible()
    screenshot("version")
    description = page.get_by_test_id("note-editor-preview-content")
    expect(description, "the version's description is missing from its page").to_contain_text(failed_audit.verdict)
    expect(description).to_contain_text(failed_audit.artifact_id)  # what it is
    expect(description).to_contain_text(POLICY_NAME)  # how it was judged: under which policy
