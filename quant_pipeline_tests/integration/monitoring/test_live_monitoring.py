"""Live monitoring through Dagster, for real: a Dagster instance, MLflow on SQLite, the tiny Llama's base and an
int8 artifact of it built and registered by the pipeline (the base in `production`, the artifact as the
`canary`), and a request log in the store. A canary clearly worse than production is taken off traffic by the
blocking check itself (alias moved back, version tagged, trail entry with the evidence, trail still intact);
an equivalent one stays.

The request log is appended line by line with the serving package's own writer (`append_request`), not served,
so each test knows every count it reads back and needs no generation; `test_served_canary.py` serves a canary
for real. The approvals are trail decisions as `signoff.approve` records them, written
directly: an approval needs a judged audit (minutes of evaluation), and monitoring starts after one.
"""

import datetime as dt
import shutil
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import pytest

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.paths import DEFAULT_ROLLBACK_POLICY
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.records import Decision
from quant_pipeline.defs.monitoring import (
    WINDOWS,
    canary_within_rollback_policy,
    hourly_monitoring_schedule,
    live_key,
    live_signals,
    request_volume_sensor,
)
from quant_pipeline.defs.resources import MonitoringSettings
from quant_pipeline.monitoring.dashboard import load_windows
from quant_pipeline.monitoring.requests import LoggedRequest
from quant_pipeline.monitoring.rollback import evaluate, load_rollback_policy
from quant_pipeline.monitoring.signals import window_signals
from quant_pipeline.release import signoff
from quant_pipeline.release.canary import CANARY_ALIAS, CANARY_ROLLED_BACK, MONITOR, roll_back_canary, set_canary
from quant_pipeline.release.report import describe
from quant_pipeline.release.trail import read_entries
from quant_pipeline_tests.support import audit_world, fresh_audit_world, replace, run_audit
from quant_pipeline_tests.traffic import HOUR, WINDOW_START, arm_traffic, write_log

BUILD = ["base_checkpoint", "calibration_set", "runtime_environment", "quantized_artifact"]
# torchao int8 weight-only: a real quantized candidate, data-free, built in a second (GPTQ takes ten on 2 cores)
CANDIDATE = Recipe(method="torchao-int8-weight", bits=8, group_size=-1)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_llama):
    """The tiny Llama's base checkpoint and one quantized artifact of it, built and registered by the pipeline."""
    root = tmp_path_factory.mktemp("monitoring")
    settings, tracker = fresh_audit_world(root, tiny_llama)
    settings = replace(settings, recipe=CANDIDATE)
    with dg.instance_for_test(temp_dir=str(root / "dagster")) as instance:
        result = run_audit(settings, tracker, instance, selection=BUILD)
    assert result.success
    return root, result.output_for_node("base_checkpoint"), result.output_for_node("quantized_artifact")


def approve(world) -> None:
    """The decision `signoff.approve` appends after a passing audit of the artifact, appended as it would be."""
    record = verify_artifact(world.store, world.aid)
    decision = Decision(
        event="approved", artifact_id=world.aid, registry_version=world.quantized, content_hash=record.content_hash,
        by="Ada Lovelace", note="approved for the monitoring tests",
    )  # fmt: skip
    signoff.record_event(world.store, world.tracker, world.name, decision.model_dump(mode="json"))


@pytest.fixture
def world(built, tmp_path, tiny_llama):
    """A private copy of the built store and registry, `production` serving the full-precision base (as before
    a first quantized release), and a Dagster instance that knows the model partition."""
    root, base, artifact = built
    copy = Path(shutil.copytree(root, tmp_path / "world", symlinks=True, ignore=shutil.ignore_patterns("dagster")))
    settings, tracker = audit_world(copy, tiny_llama)
    w = SimpleNamespace(
        store=settings.store, tracker=tracker, name=artifact["model_name"], model=str(tiny_llama),
        aid=artifact["artifact_id"], base=str(base["registry_version"]), quantized=str(artifact["registry_version"]),
        monitoring=MonitoringSettings(store_dir=str(settings.store.root)),
    )  # fmt: skip
    signoff.rollback(w.store, tracker, w.name, by="Ada Lovelace", note="serve the base meanwhile", to_base=True)
    assert str(tracker.alias_version(w.name, "production")) == w.base
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions("model", [w.model])
        w.instance = instance
        yield w


def monitor(w, start: dt.datetime = WINDOW_START):
    """Materialize the window through Dagster: the asset, then its blocking check."""
    return dg.materialize(
        [live_signals, canary_within_rollback_policy],
        partition_key=live_key(w.model, start),
        resources={"monitoring": w.monitoring, "mlflow": w.tracker},
        instance=w.instance,
        raise_on_error=False,
    )


def test_the_canary_must_be_an_approved_version_set_by_a_person(world):
    w = world
    with pytest.raises(signoff.SignOffError, match="is not approved: only approved versions can be the canary"):
        set_canary(w.store, w.tracker, w.aid, by="Ada Lovelace", note="first quantized release")
    approve(w)
    with pytest.raises(signoff.SignOffError, match="needs a name"):
        set_canary(w.store, w.tracker, w.aid, by=" ", note="first quantized release")
    entry = set_canary(w.store, w.tracker, w.aid, by="Ada Lovelace", note="first quantized release")
    assert (entry["event"], entry["registry_version"], entry["from_version"]) == ("canary set", w.quantized, None)
    assert str(w.tracker.alias_version(w.name, CANARY_ALIAS)) == w.quantized
    assert signoff.verify_model_trail(w.store, w.tracker, w.name) == []

    # a rollback acts only on a tripped decision about the version that is the canary now
    def decision(canary_version: str, invalid: int):
        rows = arm_traffic("production", 100, version=w.base, declared=100)
        rows += arm_traffic("canary", 100, version=canary_version, declared=100, invalid=invalid)
        entries = [LoggedRequest.model_validate(r) for r in rows]
        signals = window_signals(w.name, entries, WINDOW_START, WINDOW_START + HOUR)
        return evaluate(signals, load_rollback_policy(DEFAULT_ROLLBACK_POLICY))

    with pytest.raises(signoff.SignOffError, match="did not trip: nothing to roll back"):
        roll_back_canary(w.store, w.tracker, w.name, decision(w.quantized, 0), run_id=None)
    with pytest.raises(signoff.SignOffError, match="it was moved since the window was judged"):
        roll_back_canary(w.store, w.tracker, w.name, decision("99", 80), run_id=None)
    assert str(w.tracker.alias_version(w.name, CANARY_ALIAS)) == w.quantized


def test_a_clearly_worse_canary_is_rolled_back_by_the_check_with_its_evidence(world):
    w = world
    approve(w)
    set_canary(w.store, w.tracker, w.aid, by="Ada Lovelace", note="first quantized release")
    write_log(w.store.requests_path(w.name), [
        *arm_traffic("production", 300, version=w.base, declared=150, invalid=3, errors=1, latency=0.2),
        *arm_traffic("canary", 300, version=w.quantized, declared=150, invalid=60, errors=15, latency=0.5, seed=1),
    ])  # fmt: skip
    before = len(read_entries(w.store.trail_path(w.name)))
    result = monitor(w)

    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
    assert meta["rolled_back"] == f"v{w.quantized} -> v{w.base} (production)" and meta["canary_version"] == w.quantized
    tripped = {c["name"] for c in meta["criteria"] if c["tripped"]}
    assert {"validation_failure_excess", "error_rate_excess", "p95_latency_ratio"} <= tripped, meta["decision"]
    # the canary is off traffic: it now names what production serves (the base); production did not move
    canary, production = (str(w.tracker.alias_version(w.name, a)) for a in (CANARY_ALIAS, "production"))
    assert canary == production == w.base
    tags = w.tracker.client().get_model_version(w.name, w.quantized).tags
    assert tags["canary"] == "rolled back" and tags["canary_rollback_run"] == result.run_id
    entries = read_entries(w.store.trail_path(w.name))
    assert len(entries) == before + 1 and entries[-1]["seq"] == meta["trail_seq"]
    last = entries[-1]
    assert (last["event"], last["by"], last["registry_version"], last["to_version"]) == (
        CANARY_ROLLED_BACK, MONITOR, w.quantized, w.base
    )  # fmt: skip
    assert last["artifact_id"] == w.aid and last["dagster_run_id"] == result.run_id
    evidence = {c["name"]: c for c in last["evidence"]}
    assert evidence["validation_failure_excess"]["low"] > 0.05 and "60/150" in evidence["validation_failure_excess"][
        "evidence"
    ]  # fmt: skip
    assert signoff.verify_model_trail(w.store, w.tracker, w.name) == []
    assert describe(last).startswith(f"CANARY ROLLBACK v{w.quantized} → v{w.base} (production's) by {MONITOR}")

    # the asset: signals and drift stored, MLflow metrics at step = window start, the dashboard written
    (materialization,) = result.get_asset_materialization_events()
    meta = {k: getattr(v, "value", v) for k, v in materialization.materialization.metadata.items()}
    assert meta["requests"] == 600 and meta["drifted"] == "false" and meta["model_name"] == w.name
    dashboard = Path(meta["dashboard"])
    assert dashboard.is_file() and "<svg" in dashboard.read_text() and "canary rolled back" in dashboard.read_text()
    assert meta["plot"].startswith("![live signals](data:image/png;base64,")
    (window,) = load_windows(w.store, w.name)
    assert window.signals.arms["canary"].validation_failure_rate.events == 60 and window.drift.drifted is False
    client = w.tracker.client()
    exp = client.get_experiment_by_name(f"quant_pipeline/{w.name}")
    (run,) = client.search_runs([exp.experiment_id], "tags.stage = 'live_monitoring'")
    (point,) = client.get_metric_history(run.info.run_id, "live/canary/validation_failure_rate")
    assert point.step == int(WINDOW_START.timestamp()) and point.value == pytest.approx(0.4)


def test_an_equivalent_canary_stays_and_drift_is_reported_on_its_own(world):
    w = world
    approve(w)
    set_canary(w.store, w.tracker, w.aid, by="Ada Lovelace", note="first quantized release")
    code = [p.read_text()[:1500] for p in sorted(Path(signoff.__file__).parent.glob("*.py"))]  # unlike the golden set
    same = {"declared": 120, "invalid": 4, "errors": 2, "latency": 0.2, "prompts": code}
    write_log(w.store.requests_path(w.name), [
        *arm_traffic("production", 250, version=w.base, **same),
        *arm_traffic("canary", 250, version=w.quantized, seed=3, **same),
    ])  # fmt: skip
    before = len(read_entries(w.store.trail_path(w.name)))
    result = monitor(w)
    assert result.success
    (evaluation,) = result.get_asset_check_evaluations()
    meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
    assert evaluation.passed and meta["enough_evidence"] and not any(c["tripped"] for c in meta["criteria"])
    assert meta["decision"].startswith("canary within policy canary-default")
    assert str(w.tracker.alias_version(w.name, CANARY_ALIAS)) == w.quantized
    assert len(read_entries(w.store.trail_path(w.name))) == before
    (materialization,) = result.get_asset_materialization_events()
    drift = materialization.materialization.metadata
    assert drift["drifted"].value == "true" and drift["drift"].value.startswith("drift: prompt_length_psi")


def test_the_sensor_asks_for_a_window_every_n_requests_and_the_schedule_for_the_hour_just_ended(tmp_path, tiny_llama):
    store_dir = tmp_path / "store"
    monitoring = MonitoringSettings(store_dir=str(store_dir))
    model, name = str(tiny_llama), Path(tiny_llama).name
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.add_dynamic_partitions("model", [model])
        context = dg.build_sensor_context(instance=instance, resources={"monitoring": monitoring})
        assert "nothing served yet" in request_volume_sensor(context).skip_reason.skip_message
        write_log(monitoring.store.requests_path(name), arm_traffic("production", 150, version="1"))
        fired = request_volume_sensor(dg.build_sensor_context(instance=instance, resources={"monitoring": monitoring}))
        (request,) = fired.run_requests
        now = dt.datetime.now(dt.UTC)
        assert request.partition_key in (live_key(model, now), live_key(model, now - HOUR))  # the open hour
        assert request.run_key == f"volume:{model}:150" and fired.cursor == f'{{"{model}": 150}}'
        quiet = request_volume_sensor(
            dg.build_sensor_context(instance=instance, resources={"monitoring": monitoring}, cursor=fired.cursor)
        )
        assert not quiet.run_requests and "0 new requests" in quiet.skip_reason.skip_message
        tick = WINDOW_START + HOUR + dt.timedelta(minutes=5)
        # A schedule context opens an instance of its own from the given one's ref; closed here, not whenever the
        # garbage collector gets to it (a late close resets Dagster's current state storage to a dead one,
        # under whichever test runs then).
        with dg.build_schedule_context(
            instance=instance, scheduled_execution_time=tick, resources={"monitoring": monitoring}
        ) as schedule_context:
            (hourly,) = hourly_monitoring_schedule(schedule_context)
        assert hourly.partition_key == live_key(model, WINDOW_START)
        assert WINDOWS.time_window_for_partition_key(hourly.partition_key.keys_by_dimension["window"]).start == (
            WINDOW_START
        )  # fmt: skip
