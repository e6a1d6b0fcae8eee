"""Beyond one machine, on real servers: PostgreSQL (Debian's, started here), Dagster on it with the shipped instance
config (`quant_pipeline/deploy/dagster.postgres.yaml`), an MLflow tracking server on it with proxied artifact
storage, and the Dagster daemon. Two tiny models are audited at once; a second working directory with an empty
store serves the approved artifact through the server; two "hosts" append to one trail at once.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from quant_pipeline.cli.bench_deploy import mlflow_server, running_postgres
from quant_pipeline.core.hashing import file_hashes, tree_hash
from quant_pipeline.core.paths import DEFAULT_CALIBRATION
from quant_pipeline.models.tiny import write_tiny_llama
from quant_pipeline_tests.servers import REPO_ROOT, start_server, stop_process_group, tail, wait_until
from quant_pipeline_tests.support import LENIENT, edit_first_sample

BIN_DIR = Path(sys.executable).parent
MODELS = ("tiny-a", "tiny-b")


def cli(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN_DIR / "quant-pipeline"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_llama, tiny_tokenizer):
    """PostgreSQL with a `dagster` and an `mlflow` database, the MLflow server on the latter, the environment a host
    of the deployment runs with (Dagster's instance from the shipped config), and both models audited at once."""
    root = tmp_path_factory.mktemp("deployment")
    # named explicitly: tiny-a's folder says tiny_llama0, and the daemon's re-audit must keep the name it was given
    models = {"tiny-a": tiny_llama, "tiny-b": write_tiny_llama(root / "tiny-b", tiny_tokenizer, seed=1)}
    log = root / "mlflow.log"
    with running_postgres() as urls, mlflow_server(urls["mlflow"], root / "mlartifacts", log) as uri:
        home = root / "dagster_home"
        home.mkdir()
        shutil.copy(REPO_ROOT / "quant_pipeline" / "deploy" / "dagster.postgres.yaml", home / "dagster.yaml")
        (root / "policy.yaml").write_text(LENIENT)
        calibration = Path(shutil.copy(DEFAULT_CALIBRATION, root / "calibration.jsonl"))
        env = {
            **os.environ, "DAGSTER_HOME": str(home), "QP_DAGSTER_POSTGRES_URL": urls["dagster"],
            "QP_MAX_CONCURRENT_RUNS": "2", "QP_MLFLOW_TRACKING_URI": uri, "QP_STORE_DIR": str(root / "store"),
            "QP_TRAIL_LOCK_URL": urls["dagster"], "QP_CALIBRATION_FILE": str(calibration),
            "QP_POLICY_FILE": str(root / "policy.yaml"), "QP_CALIBRATION_SAMPLES": "8", "QP_SEQ_LEN": "64",
            "QP_EVAL_LIMIT": "4", "QP_EVAL_MAX_NEW_TOKENS": "16", "QP_SENSOR_INTERVAL_SECONDS": "5",
            "QP_REAUDIT_SCHEDULE": "off", "QP_MONITORING": "off",
        }  # fmt: skip
        audits = {
            name: subprocess.Popen(
                [str(BIN_DIR / "quant-pipeline"), "audit", "--model", str(path), "--model-name", name],
                env=env,
                stdout=open(root / f"audit-{name}.log", "w"),
                stderr=subprocess.STDOUT,
            )  # fmt: skip
            for name, path in models.items()
        }
        codes = {name: proc.wait(timeout=900) for name, proc in audits.items()}
        yield SimpleNamespace(root=root, urls=urls, uri=uri, env=env, codes=codes, calibration=calibration, log=log)


def artifact_of(deployment, model: str) -> str:
    lines = (deployment.root / f"audit-{model}.log").read_text().splitlines()
    return next(line.split("/reports/")[1].split("/")[0] for line in lines if line.startswith("report: "))


def dagster_instance(deployment):
    import dagster as dg

    os.environ["QP_DAGSTER_POSTGRES_URL"] = deployment.urls["dagster"]
    os.environ["QP_MAX_CONCURRENT_RUNS"] = "2"
    return dg.DagsterInstance.from_config(deployment.env["DAGSTER_HOME"])


def test_two_audits_run_at_once_with_every_run_event_metric_and_artifact_on_the_servers(deployment):
    from dagster._core.storage.dagster_run import DagsterRunStatus
    from dagster_postgres import PostgresEventLogStorage, PostgresRunStorage

    for model in MODELS:  # lenient policy: both PASS (exit 0), pending sign-off
        terminal = (deployment.root / f"audit-{model}.log").read_text()
        assert deployment.codes[model] == 0, terminal[-3000:]
        # what a person watches: progress and the verdict, not the libraries' banners and import warnings
        assert "behaviour suite: " in terminal and "\nverdict: PASS" in terminal
        for noise in ("GPT-QModel", "Failed to load", "_pytree.py", "[transformers]"):
            assert noise not in terminal, noise
    with dagster_instance(deployment) as instance:
        assert isinstance(instance.run_storage, PostgresRunStorage)
        assert isinstance(instance.event_log_storage, PostgresEventLogStorage)
        runs = instance.get_runs()
        assert len(runs) == 6 and {r.status for r in runs} == {DagsterRunStatus.SUCCESS}  # 3 phases per model
        for run in runs:
            assert instance.all_logs(run.run_id), f"no events stored for run {run.run_id}"
    client = MlflowClient(tracking_uri=deployment.uri)
    for model in MODELS:
        aid = artifact_of(deployment, model)
        mv = next(v for v in client.search_model_versions(f"name='{model}'") if v.tags.get("artifact_id") == aid)
        stored = client.list_artifacts(mv.run_id, "model/artifacts/weights")  # the weights live on the server
        assert "model/artifacts/weights/model.safetensors" in {f.path for f in stored}
        assert mv.source.startswith("mlflow-artifacts:"), mv.source  # proxied, not a path on the auditing host
        exp = client.get_experiment_by_name(f"quant_pipeline/{model}")
        evals = client.search_runs([exp.experiment_id], "tags.stage = 'quantized_eval_results'")
        assert evals and evals[0].data.metrics, "the quantized evaluation logged no metrics"
        assert cli(deployment.env, "verify-trail", model).returncode == 0


def test_a_host_with_an_empty_store_serves_the_approved_artifact_fetched_and_verified_by_hash(deployment):
    env, root = deployment.env, deployment.root
    aid = artifact_of(deployment, "tiny-a")
    for verb in ("approve", "promote"):
        done = cli(env, verb, aid, "--by", "Ada Lovelace", "--note", "tiny model, lenient policy")
        assert done.returncode == 0, done.stderr[-2000:]
    host_b = {**env, "QP_STORE_DIR": str(root / "host-b" / "store"), "DAGSTER_HOME": str(root / "host-b" / "dagster")}
    (root / "host-b" / "dagster").mkdir(parents=True)
    (root / "store").rename(root / "store.elsewhere")  # host B cannot see host A's store
    try:
        served = cli(host_b, "serve", "--model-name", "tiny-a", "--ref", "production", "--prompt", "Hello",
                     "--max-new-tokens", "4")  # fmt: skip
        assert served.returncode == 0, served.stderr[-3000:]
        answer = json.loads(served.stdout.strip().splitlines()[-1])
        assert answer["artifact_id"] == aid and answer["served_by"] == "quantized"
        fetched = root / "host-b" / "store" / "artifacts" / aid
        mv = MlflowClient(tracking_uri=deployment.uri).get_model_version_by_alias("tiny-a", "production")
        assert tree_hash(file_hashes(fetched)) == mv.tags["content_hash"]  # the registry's hash, not a local record
        assert cli(host_b, "verify-trail", "tiny-a").returncode == 0  # its trail copy caught up with the anchor

        # someone with write access to the server's artifact store swaps the weights: a third host refuses them
        weights = next(
            (root / "mlartifacts").rglob(f"*/{mv.run_id}/artifacts/model/artifacts/weights/model.safetensors")
        )
        weights.write_bytes(weights.read_bytes()[:-16] + b"\0" * 16)
        host_c = {**host_b, "QP_STORE_DIR": str(root / "host-c" / "store")}
        refused = cli(host_c, "serve", "--model-name", "tiny-a", "--ref", "production", "--prompt", "Hello")
        assert refused.returncode == 2, refused.stderr[-2000:]
        assert "model.safetensors: content changed" in refused.stderr and "nothing was kept" in refused.stderr
        assert not (root / "host-c" / "store" / "artifacts" / aid).exists()
    finally:
        (root / "store.elsewhere").rename(root / "store")


def test_a_host_rebuilds_its_store_from_the_server_keeping_only_what_the_trail_vouches_for(deployment):
    from quant_pipeline.core.hashing import sha256_file
    from quant_pipeline.core.store import ArtifactStore
    from quant_pipeline.release.trail import read_entries

    env, root = deployment.env, deployment.root
    aid = artifact_of(deployment, "tiny-b")
    host_d = {**env, "QP_STORE_DIR": str(root / "host-d" / "store")}
    pulled = cli(host_d, "pull", "tiny-b")
    assert pulled.returncode == 0, pulled.stdout[-3000:] + pulled.stderr[-3000:]
    store, original = ArtifactStore(root / "host-d" / "store"), ArtifactStore(root / "store")
    entries = read_entries(store.trail_path("tiny-b"))
    evaluated = [e for e in entries if e["event"] == "evaluated"]
    assert evaluated and all(e["artifact_id"] == aid for e in evaluated)
    for entry in evaluated:  # every file of the verdict, and the tables it was computed from, as the trail says
        report = store.delta_report_dir(aid, entry["report_key"])
        assert file_hashes(report) == entry["report_files"]
        assert sha256_file(report / "delta_report.json") == entry["report_sha256"]
        keys = json.loads((report / "delta_report.json").read_text())
        for label, key in (("base", keys["base_eval_key"]), ("quantized", keys["eval_key"])):
            for name in ("results.parquet", "items.parquet"):
                assert sha256_file(store.eval_dir(key) / name) == entry["eval_tables"][f"{label}/{name}"]
    for policy_hash in {e["policy_hash"] for e in entries if e.get("policy_hash")}:
        assert sha256_file(store.policy_path(policy_hash)) == policy_hash
    assert file_hashes(store.artifact_dir(aid)) == file_hashes(original.artifact_dir(aid))
    assert "tiny-b" in (store.report_dir("tiny-b") / "audit_report.html").read_text()
    bom = json.loads((store.report_dir(aid) / "mlbom.cdx.json").read_text())  # written here, from the verified files
    assert bom["bomFormat"] == "CycloneDX" and f"WRITTEN  ML-BOM of {aid}" in pulled.stdout
    assert cli(host_d, "verify-trail", "tiny-b").returncode == 0
    shown = cli(host_d, "show", aid)
    assert shown.returncode == 0 and json.loads(shown.stdout)["artifact_id"] == aid, shown.stderr[-2000:]
    again = cli(host_d, "pull", "tiny-b", "--no-weights")  # nothing to take twice
    assert again.returncode == 0 and f"PRESENT  delta report {aid}/" in again.stdout, again.stdout[-3000:]
    assert "FETCHED  delta report" not in again.stdout and "FETCHED  eval table" not in again.stdout

    # someone with write access to the server's artifact store swaps the quantized evaluation's per-item table
    client = MlflowClient(tracking_uri=deployment.uri)
    exp = client.get_experiment_by_name("quant_pipeline/tiny-b")
    run_id = client.search_runs([exp.experiment_id], "tags.stage = 'quantized_eval_results'")[0].info.run_id
    table = next((root / "mlartifacts").rglob(f"*/{run_id}/artifacts/items.parquet"))
    genuine = table.read_bytes()
    table.write_bytes(genuine[:-64] + b"\0" * 64)
    # and the policy shared beside the trail is gone: the copy logged with the verdict stands in, as verified
    (policy_hash,) = {e["policy_hash"] for e in evaluated}
    shared_policy = next((root / "mlartifacts").rglob(f"*/artifacts/policies/{policy_hash}.yaml"))
    shared_policy.rename(shared_policy.with_suffix(".away"))
    try:
        host_e = {**env, "QP_STORE_DIR": str(root / "host-e" / "store")}
        refused = cli(host_e, "pull", "tiny-b", "--no-weights")
        assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
        assert f"REFUSED  eval table {keys['eval_key']}/items.parquet" in refused.stdout
        assert not (ArtifactStore(root / "host-e" / "store").eval_dir(keys["eval_key"]) / "items.parquet").exists()
        assert f"FETCHED  delta report {aid}/" in refused.stdout  # the rest is taken: it verified
        assert f"FETCHED  policy {policy_hash[:12]}" in refused.stdout
        assert sha256_file(ArtifactStore(root / "host-e" / "store").policy_path(policy_hash)) == policy_hash
    finally:
        table.write_bytes(genuine)
        shared_policy.with_suffix(".away").rename(shared_policy)

    # ... or the record bundled beside the weights, which is not among the hashed files: it must agree field by field
    mv = next(v for v in client.search_model_versions("name='tiny-b'") if v.tags.get("artifact_id") == aid)
    record = next(
        (root / "mlartifacts").rglob(f"*/{mv.run_id}/artifacts/model/artifacts/weights/quant_pipeline_record.json")
    )
    genuine = record.read_text()
    record.write_text(json.dumps({**json.loads(genuine), "recipe": {"method": "identity", "bits": 16}}))
    try:
        host_f = {**env, "QP_STORE_DIR": str(root / "host-f" / "store")}
        refused = cli(host_f, "pull", "tiny-b")
        assert refused.returncode == 1, refused.stdout[-3000:] + refused.stderr[-3000:]
        assert f"REFUSED  v{mv.version} weights ({aid})" in refused.stdout and "its recipe differs" in refused.stdout
        assert not ArtifactStore(root / "host-f" / "store").artifact_dir(aid).exists()
    finally:
        record.write_text(genuine)


APPEND = """
import sys
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.release.signoff import record_event
tracker = MlflowTracker(tracking_uri=sys.argv[1])
for n in range(5):
    record_event(sys.argv[2], tracker, "tiny-b", {"event": "note", "by": sys.argv[3], "n": n})
"""


def test_two_hosts_appending_to_one_trail_at_once_lose_nothing_and_never_fork(deployment):
    client = MlflowClient(tracking_uri=deployment.uri)
    before = int(client.get_registered_model("tiny-b").tags["trail_length"])
    root = deployment.root
    hosts = [
        subprocess.Popen(
            [sys.executable, "-c", APPEND, deployment.uri, str(root / f"writer-{i}" / "store"), f"host-{i}"],
            env=deployment.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in (1, 2)
    ]
    outputs = [h.communicate(timeout=300)[0] for h in hosts]
    assert [h.returncode for h in hosts] == [0, 0], outputs
    assert int(client.get_registered_model("tiny-b").tags["trail_length"]) == before + 10
    reader = {**deployment.env, "QP_STORE_DIR": str(root / "reader" / "store")}
    assert cli(reader, "verify-trail", "tiny-b").returncode == 0
    from quant_pipeline.release.trail import read_entries

    notes = [e for e in read_entries(root / "reader" / "store" / "trail" / "tiny-b.jsonl") if e["event"] == "note"]
    assert sorted((e["by"], e["n"]) for e in notes) == sorted((f"host-{i}", n) for i in (1, 2) for n in range(5))


def test_the_daemon_on_postgres_reaudits_both_models_in_parallel_runs(deployment):
    from dagster._core.storage.dagster_run import DagsterRunStatus, RunsFilter

    from quant_pipeline.defs.automation import TRIGGER_TAG

    log = deployment.root / "daemon.log"
    daemon = start_server([str(BIN_DIR / "dagster-daemon"), "run", "-w", "workspace.yaml"], log, deployment.env)
    try:
        with dagster_instance(deployment) as instance:
            edit_first_sample(deployment.calibration, "A calibration sample about lighthouse keepers and fog signals.")

            def finished():
                runs = instance.get_runs(filters=RunsFilter(tags={TRIGGER_TAG: "calibration"}))
                done = [r for r in runs if r.status in (DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE)]
                failed = [r for r in done if r.status == DagsterRunStatus.FAILURE]
                return runs if failed or len(done) == 6 else None

            runs = wait_until(finished, timeout=900, interval=5, proc=daemon, log=log)
            assert {r.status for r in runs} == {DagsterRunStatus.SUCCESS}, tail(log)
            models = [r for r in runs if r.job_name == "model_stages"]
            assert len(models) == 2
            first, second = (instance.get_run_stats(r.run_id) for r in models)
            assert first.start_time < second.end_time and second.start_time < first.end_time, "ran one after another"
    finally:
        stop_process_group(daemon)
    for model in MODELS:
        assert cli(deployment.env, "verify-trail", model).returncode == 0
    registered = {m.name for m in MlflowClient(tracking_uri=deployment.uri).search_registered_models()}
    assert registered == set(MODELS), "a re-audit filed a model under another name than it was audited as"
