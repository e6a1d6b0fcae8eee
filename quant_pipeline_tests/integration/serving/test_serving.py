"""Serving with per-request provenance, for real: a GPTQ artifact of the tiny Llama and its base,
registered in MLflow (SQLite) as reference-only pyfuncs, served from many threads, through the
CLI, and by `mlflow models serve`; every request logged once, traced, and reproducible.
"""

import argparse
import hashlib
import json
import os
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from quant_pipeline.cli.serve import add_serving_commands as add_cli
from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.runtime import fingerprint_hash
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.release import signoff
from quant_pipeline.release.reference import base_artifact_id, log_registered_pyfunc
from quant_pipeline.serving import Server, ServingError, find_request, find_trace, reproduce, requests_path
from quant_pipeline.serving.request_log import append_request as append_jsonl
from quant_pipeline_tests.servers import free_port, start_server, stop_process_group
from quant_pipeline_tests.support import LENIENT, TINY_RECIPE, mlflow_db, run_audit

BIN_DIR = Path(sys.executable).parent
TOKENS = 8  # small budgets keep the suite fast


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_llama):
    """The base checkpoint and a GPTQ artifact of the tiny Llama, built, evaluated, registered and signed
    off by the real audit (reference-only pyfuncs, one run per version), then promoted to `production`."""
    root = tmp_path_factory.mktemp("serving")
    store = root / "store"
    tracker = MlflowTracker(tracking_uri=mlflow_db(root), artifact_root=(root / "mlartifacts").as_uri())
    policy = root / "lenient.yaml"
    policy.write_text(LENIENT)
    settings = AuditSettings(
        model=str(tiny_llama), store_dir=str(store), recipe=TINY_RECIPE, eval_limit=4, eval_max_new_tokens=16,
        policy_file=str(policy),
    )  # fmt: skip
    (root / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        result = run_audit(settings, tracker, instance, approver="Ada Lovelace", note="serving tests")
    assert result.success
    base, artifact = result.output_for_node("base_checkpoint"), result.output_for_node("quantized_artifact")
    model_name, aid = artifact["model_name"], artifact["artifact_id"]
    record = verify_artifact(settings.store, aid).dump()
    with tracker.stage_run(model_name, "one-pyfunc-per-run") as run:
        log_registered_pyfunc(run.client, run.run_id, tiny_llama, base, store_dir=store)
        with pytest.raises(ServingError, match="already holds a model"):
            log_registered_pyfunc(run.client, run.run_id, settings.store.artifact_dir(aid), record)
    quant_version = str(artifact["registry_version"])
    signoff.promote(settings.store, tracker, aid, by="Ada Lovelace", note="serving tests")
    return SimpleNamespace(
        tracker=tracker, store=store, model_name=model_name, aid=aid, artifact_dir=settings.store.artifact_dir(aid),
        record=record, base_aid=base_artifact_id(base["hash"]), base_hash=base["hash"], quant_version=quant_version,
        base_version=str(base["registry_version"]),
        quant_source=tracker.client().get_model_version(model_name, quant_version).source,
    )  # fmt: skip


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- registration ---------------------------------------------------------------------------
def test_registered_versions_carry_a_reference_not_the_weights(deployment):
    d = deployment
    mv = d.tracker.client().get_model_version(d.model_name, d.quant_version)
    assert mv.source == d.quant_source and mv.source.endswith("/model")
    logged = Path(mv.source.removeprefix("file://"))
    assert (logged / "MLmodel").exists() and not list(logged.rglob("*.safetensors")), sorted(
        p.name for p in logged.rglob("*")
    )
    ref = json.loads((logged / "artifacts" / "artifact_ref.json").read_text())
    assert (
        ref["artifact_id"] == d.aid and ref["kind"] == "quantized" and ref["model_dir"] == str(d.artifact_dir.resolve())
    )
    assert ref["files"] == d.record["files"] and ref["content_hash"] == d.record["content_hash"]
    assert (
        ref["calibration_hash"] == d.record["calibration_hash"]
        and ref["runtime"] == d.record["runtime"]
        and ref["recipe"]["bits"] == 4
    )
    assert str(d.tracker.alias_version(d.model_name, "production")) == d.quant_version


# -- many threads, one server ---------------------------------------------------------------
def test_concurrent_requests_are_each_logged_once_with_their_own_prompt_and_traced(deployment):
    d = deployment
    server = Server(d.tracker, d.model_name, "production", d.store)
    prompts = [f"Request #{i}: name a colour and a number for item {i}." for i in range(50)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(lambda i: server.generate(prompts[i], max_new_tokens=TOKENS, seed=i), range(50)))
    print(f"50 requests from 8 threads: {time.perf_counter() - t0:.1f}s")

    ids = [r["request_id"] for r in results]
    assert len(set(ids)) == 50
    raw = requests_path(d.store, d.model_name).read_text().splitlines()
    parsed = [json.loads(line) for line in raw]  # every line is one whole JSON object: nothing interleaved
    mine = [r for r in parsed if r["request_id"] in set(ids)]
    assert sorted(r["request_id"] for r in mine) == sorted(ids), "each request exactly once"
    logged = {r["request_id"]: r for r in mine}
    for i, result in enumerate(results):
        rec = logged[result["request_id"]]
        assert rec["prompt"] == prompts[i] and f"#{i}:" in rec["prompt"] and rec["prompt_sha256"] == sha256(prompts[i])
        assert (
            rec["output"] == result["output"]
            and rec["output_ids"] == result["output_ids"]
            and rec["output_tokens"] == len(rec["output_ids"])
        )
        assert rec["decoding"] == {
            "strategy": "greedy",
            "do_sample": False,
            "num_beams": 1,
            "max_new_tokens": TOKENS,
            "seed": i,
        }
        assert (rec["artifact_id"], rec["model_version"], rec["served_by"], rec["status"]) == (
            d.aid,
            d.quant_version,
            "quantized",
            "ok",
        )
        assert (rec["quant_method"], rec["bits"], rec["group_size"]) == ("gptq", 4, 64)
        assert rec["base_hash"] == d.base_hash and rec["content_hash"] == d.record["content_hash"]
        assert rec["calibration_hash"] == d.record["calibration_hash"] and rec["runtime_hash"] == fingerprint_hash(
            rec["runtime"]
        )
        assert (
            rec["latency_s"] > 0
            and rec["prompt_tokens"] > 0
            and rec["time"].endswith("+00:00")
            and rec["alias_changed"] is None
        )

    # MLflow: one trace per request in the model's experiment, found by its request_id tag.
    client = d.tracker.client()
    exp_id = client.get_experiment_by_name(f"quant_pipeline/{d.model_name}").experiment_id
    traces = client.search_traces(locations=[exp_id], max_results=500, flush=True)
    by_request = {}
    for t in traces:
        by_request.setdefault(t.info.tags.get("request_id"), []).append(t)
    for i, rid in enumerate(ids):
        assert len(by_request.get(rid, [])) == 1, f"request {rid}: {len(by_request.get(rid, []))} traces"
        trace = by_request[rid][0]
        assert trace.info.tags["artifact_id"] == d.aid and trace.info.tags["served_by"] == "quantized"
        root = trace.data.spans[0]
        assert root.inputs["prompt"] == prompts[i] and root.outputs["output_ids"] == results[i]["output_ids"]
        assert logged[rid]["trace_id"] == trace.info.trace_id
    found = find_trace(d.tracker, d.model_name, ids[7])
    assert (
        found is not None
        and found.info.tags["request_id"] == ids[7]
        and found.info.tags["runtime_hash"] == results[7]["runtime_hash"]
    )

    # Outputs belong to their prompts: a sequential re-run of some of them gives the same tokens.
    for i in (0, 17, 49):
        assert reproduce(d.tracker, d.store, d.model_name, ids[i])["status"] == "reproduced exactly"


# -- reproduction -----------------------------------------------------------------------------
def test_reproduce_is_exact_and_names_runtime_changes(deployment):
    d = deployment
    server = Server(d.tracker, d.model_name, d.aid, d.store)
    served = [
        server.generate(p, max_new_tokens=n, seed=s)
        for p, n, s in (("Write a haiku about rain.", 4, 0), ("List three fruits.", 12, 7), ("What is 2+2?", 16, 1))
    ]
    for rec in served:
        result = reproduce(d.tracker, d.store, d.model_name, rec["request_id"])
        assert result["status"] == "reproduced exactly", result
        assert (
            result["output_ids"] == rec["output_ids"]
            and result["output"] == rec["output"]
            and result["runtime_warnings"] == []
        )

    older = json.loads(json.dumps(served[0]["runtime"]))
    older["libraries"]["torch"] = "2.12.0"
    result = reproduce(d.tracker, d.store, d.model_name, served[0]["request_id"], current_fingerprint=older)
    assert result["runtime_warnings"] == [f"libraries.torch: {served[0]['runtime']['libraries']['torch']} -> 2.12.0"], (
        result["runtime_warnings"]
    )
    assert result["logged_runtime_hash"] != result["current_runtime_hash"]

    # A logged output the artifact does not give (e.g. served on other hardware) is reported as divergence.
    ids = served[1]["output_ids"]
    assert len(ids) >= 3, ids
    altered = {**served[1], "request_id": "altered-output", "output_ids": ids[:2] + [ids[2] + 1] + ids[3:]}
    append_jsonl(requests_path(d.store, d.model_name), altered)
    result = reproduce(d.tracker, d.store, d.model_name, "altered-output")
    assert result["status"] == "diverged" and result["first_divergent_token"] == 2

    private = Server(d.tracker, d.model_name, "production", d.store, log_prompts=False)
    secret = "my account number is 12345678, what should I do?"
    rec = private.generate(secret, max_new_tokens=4)
    line = next(
        line for line in requests_path(d.store, d.model_name).read_text().splitlines() if rec["request_id"] in line
    )
    assert (
        secret not in line
        and json.loads(line)["prompt"] is None
        and json.loads(line)["prompt_sha256"] == sha256(secret)
    )
    assert find_trace(d.tracker, d.model_name, rec["request_id"]).data.spans[0].inputs["prompt"] is None
    with pytest.raises(ServingError, match="without its prompt"):
        reproduce(d.tracker, d.store, d.model_name, rec["request_id"])
    with pytest.raises(ServingError, match="no request nope"):
        reproduce(d.tracker, d.store, d.model_name, "nope")


# -- integrity ----------------------------------------------------------------------------------
@pytest.mark.parametrize("victim", ["tokenizer.json", "model.safetensors"])
def test_tampered_artifact_is_refused_naming_the_file(deployment, victim, monkeypatch):
    import mlflow.pyfunc

    d = deployment
    path = d.artifact_dir / victim
    original = path.read_bytes()
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", d.tracker.tracking_uri)
    monkeypatch.setenv("QP_STORE_DIR", str(d.store))
    served = Server(d.tracker, d.model_name, "production", d.store).generate(
        "served before the tampering", max_new_tokens=4
    )
    named = rf"{d.aid}.*{victim.replace('.', '[.]')}: content changed"
    try:
        with open(path, "ab") as f:
            f.write(b"\0")
        for ref in ("production", d.aid):
            with pytest.raises(ServingError, match=named):
                Server(d.tracker, d.model_name, ref, d.store)
        with pytest.raises(ServingError, match=named):
            mlflow.pyfunc.load_model(d.quant_source)  # the pyfunc's load_context verifies too
        with pytest.raises(ServingError, match=named):
            reproduce(d.tracker, d.store, d.model_name, served["request_id"])
    finally:
        path.write_bytes(original)
    assert Server(d.tracker, d.model_name, "production", d.store).current.artifact_id == d.aid


def test_pyfunc_loads_in_process_and_accepts_lists_dicts_and_frames(deployment, monkeypatch):
    import mlflow.pyfunc
    import pandas as pd

    d = deployment
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", d.tracker.tracking_uri)
    monkeypatch.setenv("QP_STORE_DIR", str(d.store))
    model = mlflow.pyfunc.load_model(d.quant_source)
    out = model.predict(["pyfunc list prompt"], params=None)
    assert out[0]["artifact_id"] == d.aid and out[0]["served_by"] == "quantized" and isinstance(out[0]["output"], str)
    frame = model.predict(
        pd.DataFrame(
            [
                {"prompt": "pyfunc frame prompt", "max_new_tokens": 4, "request_id": "frame-1"},
                {"prompt": "critical one", "critical": True, "max_new_tokens": 4},
            ]
        )
    )
    assert list(frame["served_by"]) == ["quantized", "base"] and frame["request_id"][0] == "frame-1"
    one = model.predict({"prompt": "pyfunc dict prompt", "max_new_tokens": 3, "seed": 5})
    assert find_request(d.store, d.model_name, one[0]["request_id"])["decoding"]["seed"] == 5
    assert find_request(d.store, d.model_name, "frame-1")["prompt"] == "pyfunc frame prompt"


def test_versions_registered_with_a_plain_directory_source_are_served_too(deployment, mlflow_tracker, tiny_llama):
    """What the pipeline registered before the pyfunc: the checkpoint directory's URI as the source."""
    d = deployment
    tracker = mlflow_tracker
    with tracker.stage_run(d.model_name, "legacy_registration") as run:
        base_version = tracker.register_artifact(
            d.model_name,
            d.base_aid,
            tiny_llama.as_uri(),
            run.run_id,
            {"kind": "base", "artifact_id": d.base_aid, "content_hash": d.base_hash},
        )
        version = tracker.register_artifact(
            d.model_name,
            d.aid,
            d.artifact_dir.as_uri(),
            run.run_id,
            {"kind": "quantized", "artifact_id": d.aid, "content_hash": d.record["content_hash"]},
        )
    tracker.set_alias(d.model_name, "production", version)
    server = Server(tracker, d.model_name, "production", d.store)
    rec = server.generate("served from a directory source", max_new_tokens=4)
    assert (rec["artifact_id"], rec["model_version"], rec["bits"], rec["runtime_hash"]) == (
        d.aid,
        str(version),
        4,
        fingerprint_hash(rec["runtime"]),
    )
    critical = server.generate("critical, from the base directory", max_new_tokens=4, critical=True)
    assert (critical["artifact_id"], critical["model_version"], critical["served_by"]) == (
        d.base_aid,
        str(base_version),
        "base",
    )
    assert reproduce(tracker, d.store, d.model_name, rec["request_id"])["status"] == "reproduced exactly"
    pinned = Server(tracker, d.model_name, f"v{version}", d.store)
    assert pinned.current.artifact_id == d.aid and pinned.alias is None


# -- routing ------------------------------------------------------------------------------------
def test_critical_requests_and_rules_are_served_by_the_base(deployment):
    d = deployment
    rule = r"(?i)\bdiagnos\w*"
    server = Server(d.tracker, d.model_name, "production", d.store, critical_rules=[rule])
    normal = server.generate("Summarise the weather report.", max_new_tokens=TOKENS)
    flagged = server.generate("Is this dosage safe?", max_new_tokens=TOKENS, critical=True)
    matched = server.generate("Please Diagnose these symptoms.", max_new_tokens=TOKENS)
    assert (normal["served_by"], normal["artifact_id"], normal["route_reason"]) == (
        "quantized",
        d.aid,
        "ref: production",
    )
    for rec, reason in ((flagged, "critical flag"), (matched, f"rule: {rule}")):
        logged = find_request(d.store, d.model_name, rec["request_id"])
        assert (logged["served_by"], logged["route_reason"]) == ("base", reason)
        assert (logged["artifact_id"], logged["model_version"], logged["content_hash"]) == (
            d.base_aid,
            d.base_version,
            d.base_hash,
        )
        assert (logged["quant_method"], logged["bits"], logged["group_size"]) == ("none", None, None)
        assert reproduce(d.tracker, d.store, d.model_name, rec["request_id"])["status"] == "reproduced exactly"


# -- rollback at serving time ---------------------------------------------------------------------
def test_alias_rollback_takes_effect_on_the_next_request_without_restart(deployment):
    d = deployment
    server = Server(d.tracker, d.model_name, "production", d.store)
    before = server.generate("before the rollback", max_new_tokens=TOKENS)
    try:
        d.tracker.set_alias(d.model_name, "production", d.base_version)
        after = server.generate("after the rollback", max_new_tokens=TOKENS)
        later = server.generate("later still", max_new_tokens=TOKENS)
        d.tracker.set_alias(d.model_name, "production", d.quant_version)
        back = server.generate("after the re-promotion", max_new_tokens=TOKENS)
    finally:
        d.tracker.set_alias(d.model_name, "production", d.quant_version)
    assert (before["artifact_id"], before["alias_changed"]) == (d.aid, None)
    logged = find_request(d.store, d.model_name, after["request_id"])
    assert (logged["artifact_id"], logged["served_by"], logged["model_version"]) == (d.base_aid, "base", d.base_version)
    assert logged["alias_changed"] == f"v{d.quant_version}->v{d.base_version}"
    assert (later["artifact_id"], later["alias_changed"]) == (d.base_aid, None)
    assert (back["artifact_id"], back["alias_changed"]) == (d.aid, f"v{d.base_version}->v{d.quant_version}")
    assert (
        find_trace(d.tracker, d.model_name, after["request_id"]).info.tags["alias_changed"] == logged["alias_changed"]
    )


# -- CLI ------------------------------------------------------------------------------------------
def test_cli_serve_then_reproduce(deployment, monkeypatch, capsys):
    d = deployment
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", d.tracker.tracking_uri)
    monkeypatch.setenv("QP_STORE_DIR", str(d.store))
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            "serve",
            "--model-name",
            d.model_name,
            "--prompt",
            "cli prompt one",
            "--prompt",
            "cli prompt two",
            "--max-new-tokens",
            "4",
        ]
    )
    assert args.func(args) == 0
    lines = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")
    ]  # gptqmodel prints too
    assert [line["artifact_id"] for line in lines] == [d.aid, d.aid]
    args = parser.parse_args(["reproduce", lines[1]["request_id"], "--model-name", d.model_name])
    assert args.func(args) == 0
    assert "reproduced exactly" in capsys.readouterr().out


# -- mlflow models serve ----------------------------------------------------------------------------
def test_mlflow_models_serve_answers_and_logs_each_request(deployment, tmp_path):
    d = deployment
    port, log = free_port(), tmp_path / "models_serve.log"
    env = {
        **os.environ, "MLFLOW_TRACKING_URI": d.tracker.tracking_uri, "QP_MLFLOW_TRACKING_URI": d.tracker.tracking_uri,
        "QP_STORE_DIR": str(d.store), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",  # the server execs `uvicorn` from the venv
    }  # fmt: skip
    cmd = [
        str(BIN_DIR / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{d.model_name}@production",
        "--env-manager",
        "local",
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
        "-w",
        "1",
    ]
    proc = start_server(cmd, log, env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, f"mlflow models serve exited {proc.returncode}\n{log.read_text()[-4000:]}"
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=5) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, f"not ready after 240s\n{log.read_text()[-4000:]}"
            time.sleep(2)
        rid = f"http-{time.time_ns()}"
        body = {"dataframe_records": [
            {"prompt": "Served over HTTP #1", "max_new_tokens": TOKENS, "request_id": rid},
            {"prompt": "Served over HTTP #2, critical", "max_new_tokens": TOKENS, "critical": True},
        ]}  # fmt: skip
        req = urllib.request.Request(
            f"{url}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as resp:
            assert resp.status == 200
            predictions = json.loads(resp.read())["predictions"]
        assert predictions[0]["request_id"] == rid and isinstance(predictions[0]["output"], str)
        assert (predictions[0]["artifact_id"], predictions[0]["served_by"]) == (d.aid, "quantized")
        assert (predictions[1]["artifact_id"], predictions[1]["served_by"]) == (d.base_aid, "base")
        logged = find_request(d.store, d.model_name, rid)
        assert (
            logged["prompt"] == "Served over HTTP #1"
            and logged["output"] == predictions[0]["output"]
            and logged["model_version"] == d.quant_version
        )
        assert find_request(d.store, d.model_name, predictions[1]["request_id"])["route_reason"] == "critical flag"
        deadline = time.monotonic() + 60  # the server exports traces asynchronously
        while (trace := find_trace(d.tracker, d.model_name, rid)) is None:
            assert time.monotonic() < deadline, "trace of the served request never appeared"
            time.sleep(1)
        assert trace.info.tags["artifact_id"] == d.aid
        assert reproduce(d.tracker, d.store, d.model_name, rid)["status"] == "reproduced exactly"
    finally:
        stop_process_group(proc)
