"""A damaged canary taken off live traffic with nobody typing anything: the real Dagster daemon (`dagster dev`, as
`make ui` runs it) watches the store a real HTTP server logs to; nothing in this test materializes an asset or
calls the rollback.

The fleet (`quant_pipeline_tests/fleet.py`) puts an identity candidate of the tiny Llama in `production` and a
copy with noise on one layer in `canary`. Golden prompts go through `HttpFrontend` on loopback in shadow mode;
once `REQUESTS` of them are logged, `request_volume_sensor` requests a `live_signals` run for the current hour,
the daemon launches it, and its blocking check `canary_within_rollback_policy` trips on the shadow answers, moves
the alias back to production's version and writes the trail entry. The test only waits for the alias to move,
then reads what happened back: the trail, the run and its tags, the check's evaluation, the next request.
"""

import datetime as dt
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import dagster as dg
from dagster._core.events import DagsterEventType
from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

from quant_pipeline.defs.monitoring import TRIGGER_TAG, live_signals
from quant_pipeline.release.canary import CANARY_ALIAS, CANARY_ROLLED_BACK, MONITOR
from quant_pipeline.release.signoff import verify_model_trail
from quant_pipeline.release.trail import read_entries
from quant_pipeline.serving import HttpFrontend, Server, ServingConfig
from quant_pipeline_tests.fleet import POLICY, REQUESTS, TOKENS, build_fleet, schema_items
from quant_pipeline_tests.servers import REPO_ROOT, free_port, start_server, stop_process_group, tail, wait_until
from quant_pipeline_tests.support import mlflow_db

BIN_DIR = Path(sys.executable).parent
CHECK = "canary_within_rollback_policy"


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def logged(fleet, request_id: str) -> dict:
    """The request log's line for one request (the server writes exactly one)."""
    lines = fleet.store.requests_path(fleet.name).read_text().splitlines()
    (entry,) = [e for e in map(json.loads, lines) if e["request_id"] == request_id]
    return entry


def wait_for_a_whole_hour_ahead(seconds: int = 150) -> None:
    """The sensor measures the hour in progress: the traffic and its run must not straddle the top of the hour."""
    now = dt.datetime.now(dt.UTC)
    left = 3600 - (now.minute * 60 + now.second)
    if left < seconds:
        time.sleep(left + 1)


def test_the_daemon_rolls_a_damaged_canary_back_from_live_traffic_with_nobody_triggering_it(
    tmp_path, tiny_llama, monkeypatch
):
    home, policy = tmp_path / "dagster_home", tmp_path / "rollback.yaml"
    home.mkdir()
    shutil.copy(REPO_ROOT / "dagster.yaml", home / "dagster.yaml")
    policy.write_text(POLICY)
    root = tmp_path / "fleet"
    root.mkdir()
    model = str(root / "tiny-served")  # the model partition key: build_fleet copies the checkpoint there
    env = {
        "DAGSTER_HOME": str(home), "QP_STORE_DIR": str(root / "store"),
        "QP_MLFLOW_TRACKING_URI": mlflow_db(root), "QP_ROLLBACK_POLICY": str(policy),
        "QP_MONITOR_EVERY_N_REQUESTS": str(REQUESTS), "QP_SENSOR_INTERVAL_SECONDS": "3",
        "QP_MONITOR_CRON": "0 0 1 1 *",  # the hourly schedule stays out of the way: the sensor alone asks
        "QP_REAUDIT_SCHEDULE": "off",
    }  # fmt: skip
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:  # the storage the daemon will use: the model is known to it
        instance.add_dynamic_partitions("model", [model])

    wait_for_a_whole_hour_ahead()
    port, log = free_port(), tmp_path / "dagster_dev.log"
    proc = start_server(
        [str(BIN_DIR / "dagster"), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        log,
        {**os.environ, **env},
    )
    front = None
    try:
        f = build_fleet(root, tiny_llama)  # while the daemon and its code location start
        assert f.model == model
        f.tracker.set_alias(f.name, CANARY_ALIAS, f.broken[1])  # a person's decision, before any traffic
        server = Server(f.tracker, f.name, "production", f.store.root, config=ServingConfig(mode="shadow"))
        front = HttpFrontend(server).start()
        for i, item in enumerate(schema_items()[:REQUESTS]):
            body = {"prompt": item["prompt"], "max_new_tokens": TOKENS, "seed": i, "schema": item["schema"],
                    "request_id": f"live-{i:02d}"}  # fmt: skip
            answer = post(f"{front.url}/v1/generate", body)
            assert (answer["status"], answer["artifact_id"]) == ("ok", f.production[0]), answer
        assert logged(f, "live-00")["shadow"]["artifact_id"] == f.broken[0]  # the damaged bytes did shadow

        # nobody acts from here on: the sensor sees REQUESTS new lines, the daemon runs the window and its check
        wait_until(lambda: str(f.tracker.alias_version(f.name, CANARY_ALIAS)) == f.production[1],
                   timeout=300, interval=2, proc=proc, log=log)  # fmt: skip

        with dg.DagsterInstance.get() as instance:

            def finished_run():
                (run,) = instance.get_runs(filters=RunsFilter(job_name="live_monitoring"))
                return run if run.is_finished else None

            run = wait_until(finished_run, timeout=120, interval=2, proc=proc, log=log)
            assert run.status == DagsterRunStatus.FAILURE, tail(log)  # a blocking check that failed: the alert
            assert run.tags["dagster/sensor_name"] == "request_volume_sensor"
            assert run.tags[TRIGGER_TAG] == f"{REQUESTS} new requests"
            assert run.tags["dagster/run_key"] == f"volume:{model}:{REQUESTS}"
            assert run.tags["dagster/partition/model"] == model
            events = instance.all_logs(run.run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
            (evaluation,) = [e.dagster_event.event_specific_data for e in events]
            assert (evaluation.asset_key, evaluation.check_name) == (live_signals.key, CHECK)
            assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
            meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
            assert meta["rolled_back"] == f"v{f.broken[1]} -> v{f.production[1]} (production)"
            assert (meta["canary_version"], meta["canary_shadowed"]) == (f.broken[1], REQUESTS)

        last = read_entries(f.store.trail_path(f.name))[-1]
        assert (last["event"], last["by"], last["dagster_run_id"]) == (CANARY_ROLLED_BACK, MONITOR, run.run_id)
        assert (last["registry_version"], last["artifact_id"], last["to_version"]) == (f.broken[1], f.broken[0],
                                                                                        f.production[1])  # fmt: skip
        (tripped,) = last["evidence"]
        assert (tripped["name"], tripped["source"], tripped["tripped"]) == ("shadow_identical_min", "shadow", True)
        assert tripped["high"] < 0.2 and "shadow identical outputs" in tripped["evidence"], tripped
        assert verify_model_trail(f.store, f.tracker, f.name) == []

        answer = post(f"{front.url}/v1/generate", {"prompt": "What is the capital of France?", "max_new_tokens": TOKENS,
                                                   "request_id": "after-rollback"})  # fmt: skip
        shadow = logged(f, "after-rollback")["shadow"]
        assert answer["artifact_id"] == f.production[0] and shadow["artifact_id"] == f.production[0] != f.broken[0]
        assert str(shadow["model_version"]) == f.production[1] and shadow["identical"] is True
        health = json.loads(urllib.request.urlopen(f"{front.url}/healthz", timeout=10).read())
        assert str(health["canary"]["model_version"]) == f.production[1]
    finally:
        if front is not None:
            front.shutdown()
        stop_process_group(proc)
