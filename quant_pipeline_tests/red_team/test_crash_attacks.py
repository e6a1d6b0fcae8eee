"""Red team, crash safety (#12 case 10): `kill -9` in the middle of an audit leaves no run STARTED for
ever and nothing half-written that a later audit would reuse."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from quant_pipeline.core.store import TMP_PREFIX, ArtifactStore
from quant_pipeline.defs.recovery import PID_TAG, fail_orphaned_runs
from quant_pipeline_tests.support import mlflow_db


def test_a_killed_audit_is_marked_failed_at_the_next_start_and_its_temp_files_swept(tmp_path, tiny_llama):
    home, store = tmp_path / "dagster_home", tmp_path / "store"
    home.mkdir()
    env = {
        **os.environ, "DAGSTER_HOME": str(home), "QP_STORE_DIR": str(store),
        "QP_MLFLOW_TRACKING_URI": mlflow_db(tmp_path), "QP_EVAL_LIMIT": "4",
        "QP_CALIBRATION_SAMPLES": "8", "QP_SEQ_LEN": "64", "QP_EVAL_MAX_NEW_TOKENS": "16",
    }  # fmt: skip
    cmd = [str(Path(sys.executable).parent / "quant-pipeline"), "audit", "--model", str(tiny_llama)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            # kill once GPTQ is writing its artifact (a temp folder exists), the worst moment
            if list((store / "artifacts").glob(f"{TMP_PREFIX}*")) if (store / "artifacts").exists() else []:
                break
            time.sleep(0.2)
        assert proc.poll() is None, "the audit ended before it could be killed mid-write"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    instance = dg.DagsterInstance.from_config(str(home))  # the instance the CLI used
    model_run, candidate_run = sorted(instance.get_runs(), key=lambda r: r.job_name, reverse=True)
    assert model_run.job_name == "model_stages" and model_run.status == dg.DagsterRunStatus.SUCCESS
    assert candidate_run.status == dg.DagsterRunStatus.STARTED and candidate_run.tags[PID_TAG] == str(proc.pid)
    leftovers = list((store / "artifacts").glob(f"{TMP_PREFIX}*"))
    assert leftovers

    assert fail_orphaned_runs(instance) == [candidate_run.run_id]
    assert instance.get_run_by_id(candidate_run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert set(ArtifactStore(store).sweep_stale()) == set(leftovers)
    assert not list((store / "artifacts").iterdir())  # no partial artifact for a later audit to reuse


def test_a_signal_during_one_candidate_stops_the_whole_comparison(tmp_path, tiny_llama):
    """`kill` (SIGTERM) while the first candidate runs: Dagster fails that run as interrupted, and the command
    stops there with 130, instead of treating it as one crashed candidate and auditing the next."""
    env = {
        **os.environ, "DAGSTER_HOME": str(tmp_path / "dagster_home"), "QP_STORE_DIR": str(tmp_path / "store"),
        "QP_MLFLOW_TRACKING_URI": mlflow_db(tmp_path), "QP_EVAL_LIMIT": "4",
        "QP_EVAL_MAX_NEW_TOKENS": "16",
    }  # fmt: skip
    log = tmp_path / "out.log"
    cmd = [
        str(Path(sys.executable).parent / "quant-pipeline"), "audit", "--model", str(tiny_llama),
        "--candidates", "torchao-int8-weight,identity",
    ]  # fmt: skip
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and "quantized harness" not in log.read_text():
                time.sleep(0.2)  # the first candidate's evaluation has started
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    text = log.read_text()
    assert code == 130, text[-3000:]
    assert "interrupted during torchao-int8-weight: no further candidate was audited" in text
    assert "== candidate 2/2" not in text
