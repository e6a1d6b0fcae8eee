"""The user-facing servers, for real, on loopback: `dagster dev` (what `make ui` runs) and
`mlflow server` (what `make mlflow` runs), each started as a subprocess on a free port.

Everything they write goes under tmp_path: nothing lands in the checkout.
"""

import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from mlflow.tracking import MlflowClient

from quant_pipeline_tests.servers import REPO_ROOT, free_port, start_server, stop_process_group, tail, wait_until
from quant_pipeline_tests.support import edit_first_sample, mlflow_db, replace, run_audit

BIN_DIR = Path(sys.executable).parent
STAGES = [
    "base_checkpoint",
    "calibration_set",
    "runtime_environment",
    "quantized_artifact",
    "base_eval_results",
    "quantized_eval_results",
    "delta_report",
    "approval",
]


def http_get(url: str, timeout: float = 10.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read().decode()


def graphql(port: int, query: str, timeout: float = 30.0) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/graphql",
        data=json.dumps({"query": query}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        body = json.loads(resp.read())
    assert not body.get("errors"), body["errors"]
    return body["data"]


WORKSPACE_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        loadStatus
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { repositories { name assetNodes { assetKey { path } } } }
          ... on PythonError { message stack }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


# -- dagster dev -----------------------------------------------------------------------------
def test_dagster_dev_loads_the_code_location_with_every_stage(tmp_path):
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "QP_STORE_DIR": str(tmp_path / "store"),
        "QP_MLFLOW_TRACKING_URI": mlflow_db(tmp_path),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    port, log = free_port(), tmp_path / "dagster_dev.log"
    proc = start_server(
        [str(BIN_DIR / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)], log, env
    )
    try:

        def location_done():
            data = graphql(port, WORKSPACE_QUERY)["workspaceOrError"]
            assert data["__typename"] == "Workspace", data
            entries = {e["name"]: e for e in data["locationEntries"]}
            entry = entries.get("quant_pipeline")
            return entry if entry and entry["loadStatus"] == "LOADED" else None

        entry = wait_until(location_done, timeout=180, proc=proc, log=log)
        location = entry["locationOrLoadError"]
        assert location["__typename"] == "RepositoryLocation", f"code location failed to load: {location}\n{tail(log)}"
        asset_keys = {
            "/".join(node["assetKey"]["path"]) for repo in location["repositories"] for node in repo["assetNodes"]
        }
        missing = set(STAGES) - asset_keys
        assert not missing, (
            f"stages missing from the code location: {sorted(missing)} (found {sorted(asset_keys)})\n{tail(log)}"
        )
    finally:
        stop_process_group(proc)


# -- mlflow server ---------------------------------------------------------------------------


def test_mlflow_server_shows_audit_runs_metrics_and_registered_version(
    tmp_path, tiny_settings, mlflow_tracker, instance, lenient_policy
):
    settings = replace(tiny_settings, policy_file=str(lenient_policy))
    result = run_audit(settings, mlflow_tracker, instance)
    assert result.success, [c for c in result.get_asset_check_evaluations() if not c.passed]
    artifact = result.output_for_node("quantized_artifact")

    port, log = free_port(), tmp_path / "mlflow_server.log"
    cmd = [
        str(BIN_DIR / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{tmp_path}/mlflow.db",
        "--default-artifact-root", str(tmp_path / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    proc = start_server(cmd, log)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: http_get(f"{url}/health"), timeout=120, proc=proc, log=log)
        client = MlflowClient(tracking_uri=url)

        exp = client.get_experiment_by_name(f"quant_pipeline/{Path(settings.model).name}")
        assert exp is not None, f"experiment missing on the server\n{tail(log)}"
        runs = client.search_runs([exp.experiment_id])
        by_stage = {r.data.tags.get("stage"): r for r in runs}
        assert {"base_checkpoint", "quantized_artifact", "quantized_eval_results", "delta_report", "approval"} <= set(
            by_stage
        ), sorted(map(str, by_stage))
        assert "acc/facts" in by_stage["quantized_eval_results"].data.metrics, sorted(
            by_stage["quantized_eval_results"].data.metrics
        )

        versions = client.search_model_versions(f"name='{artifact['model_name']}'")
        assert artifact["artifact_id"] in {v.tags.get("artifact_id") for v in versions}, [v.tags for v in versions]
    finally:
        stop_process_group(proc)


# -- the daemon re-audits on a calibration change -------------------------------------------
def test_daemon_launches_and_completes_a_reaudit_after_a_calibration_change(
    tmp_path, tiny_llama, lenient_policy, monkeypatch
):
    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    from quant_pipeline.core.paths import DEFAULT_CALIBRATION
    from quant_pipeline.defs.automation import CALIBRATION_STAGES, FROM_TAG, TO_TAG, TRIGGER_TAG
    from quant_pipeline.defs.resources import build_resources

    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    calibration = Path(shutil.copy(DEFAULT_CALIBRATION, tmp_path / "calibration.jsonl"))
    settings_env = {
        "DAGSTER_HOME": str(home), "QP_MODEL": str(tiny_llama), "QP_CALIBRATION_FILE": str(calibration),
        "QP_POLICY_FILE": str(lenient_policy), "QP_STORE_DIR": str(tmp_path / "store"),
        "QP_MLFLOW_TRACKING_URI": mlflow_db(tmp_path), "QP_CALIBRATION_SAMPLES": "8", "QP_SEQ_LEN": "64",
        "QP_EVAL_LIMIT": "4", "QP_SENSOR_INTERVAL_SECONDS": "5", "QP_REAUDIT_SCHEDULE": "off",
    }  # fmt: skip
    for key, value in settings_env.items():
        monkeypatch.setenv(key, value)
    with dg.DagsterInstance.get() as instance:  # the same storage the daemon will use
        resources = build_resources()
        first = run_audit(resources["settings"], resources["mlflow"], instance)
        assert first.success
        model = first.results[0].dagster_run.tags["dagster/partition"]

    port, log = free_port(), tmp_path / "dagster_dev.log"
    proc = start_server(
        [str(BIN_DIR / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        log,
        {**os.environ, **settings_env},
    )
    try:
        with dg.DagsterInstance.get() as instance:
            wait_until(lambda: graphql(port, "{ version }"), timeout=180, proc=proc, log=log)
            edit_first_sample(calibration, "A calibration sample about lighthouse keepers and fog signals.")

            def reaudit_finished():
                """The calibration re-audit's three runs, once the last (the comparison) has finished."""
                runs = instance.get_runs(filters=RunsFilter(tags={TRIGGER_TAG: "calibration"}))
                done = [r for r in runs if r.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)]
                failed = [r for r in done if r.status == DagsterRunStatus.FAILURE]
                return sorted(runs, key=lambda r: r.job_name) if failed or len(done) == 3 else None

            runs = wait_until(reaudit_finished, timeout=480, interval=3, proc=proc, log=log)
            assert [r.status for r in runs] == [DagsterRunStatus.SUCCESS] * 3, tail(log)
            candidate, comparison, model_run = runs  # by job name: candidate_stages, comparison, model_stages
            assert model_run.tags[FROM_TAG] != model_run.tags[TO_TAG]
            assert (
                model_run.tags[TO_TAG].startswith("calibration.jsonl@") and model_run.tags["dagster/partition"] == model
            )
            assert candidate.tags["quant_pipeline/after_run"] == model_run.run_id  # only after the model's run
            assert (
                candidate.tags["dagster/partition/model"] == model and candidate.tags[TO_TAG] == model_run.tags[TO_TAG]
            )
            assert {k.to_user_string() for r in runs for k in r.asset_selection} == set(CALIBRATION_STAGES)
            assert comparison.tags["dagster/partition"] == model
            time.sleep(12)  # two more sensor intervals: the same change must not launch a second re-audit
            assert len(instance.get_runs(filters=RunsFilter(tags={TRIGGER_TAG: "calibration"}))) == 3
    finally:
        stop_process_group(proc)
