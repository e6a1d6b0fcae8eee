"""Red team, serving (#12 case 6): nothing reaches a user without a recorded sign-off.

Each test takes a path an operator with MLflow access could use to serve an unapproved artifact —
an explicit version, an artifact ID, moving `production` in the MLflow UI, `mlflow models serve`
on a version URI — and pins the refusal. `--allow-unapproved` exists for testing and is written
into every request it serves."""

import json
from types import SimpleNamespace

import dagster as dg
import mlflow.pyfunc
import pytest

from quant_pipeline.cli import main
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.serving import Server, ServingError, find_request
from quant_pipeline_tests.support import TINY_RECIPE, mlflow_db, run_audit


@pytest.fixture(scope="module")
def pending(tmp_path_factory, tiny_llama):
    """A GPTQ artifact built and registered by the real assets, never evaluated or approved."""
    root = tmp_path_factory.mktemp("unapproved")
    tracker = MlflowTracker(tracking_uri=mlflow_db(root), artifact_root=(root / "mlartifacts").as_uri())
    settings = AuditSettings(model=str(tiny_llama), store_dir=str(root / "store"), recipe=TINY_RECIPE)
    (root / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        result = run_audit(settings, tracker, instance, selection=["base_checkpoint", "calibration_set",
                           "runtime_environment", "quantized_artifact"])  # fmt: skip
    artifact, base = result.output_for_node("quantized_artifact"), result.output_for_node("base_checkpoint")
    version = str(artifact["registry_version"])
    source = tracker.client().get_model_version(artifact["model_name"], version).source
    return SimpleNamespace(
        root=root, tracker=tracker, store=settings.store, name=artifact["model_name"], aid=artifact["artifact_id"],
        version=version, base_version=str(base["registry_version"]), source=source,
    )  # fmt: skip


@pytest.mark.parametrize("ref", ["artifact", "version", "pinned"])
def test_an_unapproved_version_is_refused_by_id_version_or_pin(pending, ref):
    p = pending
    name = {"artifact": p.aid, "version": p.version, "pinned": f"v{p.version}"}[ref]
    with pytest.raises(ServingError, match="not approved") as refused:
        Server(p.tracker, p.name, name, p.store)
    assert "--allow-unapproved" in str(refused.value) and "\n" not in str(refused.value)


def test_moving_production_outside_sign_off_is_refused(pending):
    p = pending
    p.tracker.set_alias(p.name, "production", p.version)  # what a click in the MLflow UI does
    with pytest.raises(ServingError, match=r"alias `production` -> v\d+: .* not approved"):
        Server(p.tracker, p.name, "production", p.store)


def test_a_running_server_refuses_once_the_alias_moves_to_an_unapproved_version(pending):
    p = pending
    p.tracker.set_alias(p.name, "production", p.base_version)  # the kept base is always servable
    server = Server(p.tracker, p.name, "production", p.store)
    assert server.generate("before the move", max_new_tokens=2)["served_by"] == "base"
    p.tracker.set_alias(p.name, "production", p.version)
    with pytest.raises(ServingError, match="not approved"):
        server.generate("after the move", max_new_tokens=2)


def test_mlflow_pyfunc_of_an_unapproved_version_refuses_to_load(pending, monkeypatch):
    p = pending
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", p.tracker.tracking_uri)
    monkeypatch.delenv("QP_SERVE_ALLOW_UNAPPROVED", raising=False)
    with pytest.raises(Exception, match="not approved"):
        mlflow.pyfunc.load_model(p.source)


def test_allow_unapproved_serves_and_says_so_in_every_request(pending, monkeypatch, capsys):
    p = pending
    server = Server(p.tracker, p.name, p.aid, p.store, allow_unapproved=True)
    record = server.generate("testing only", max_new_tokens=2)
    assert (
        record["allow_unapproved"] is True and find_request(p.store, p.name, record["request_id"])["allow_unapproved"]
    )
    monkeypatch.setenv("QP_STORE_DIR", str(p.store.root))
    monkeypatch.setenv("QP_MLFLOW_TRACKING_URI", p.tracker.tracking_uri)
    args = ["serve", "--model-name", p.name, "--ref", p.aid, "--prompt", "cli", "--max-new-tokens", "2"]
    assert main(args) == 2 and "not approved" in capsys.readouterr().err
    assert main([*args, "--allow-unapproved"]) == 0
    served = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert find_request(p.store, p.name, served["request_id"])["allow_unapproved"] is True
