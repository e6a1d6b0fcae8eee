"""Live monitoring on traffic really served: `Server` in shadow mode answers from `production` (the tiny Llama,
an identity candidate) while the `canary` runs every prompt beside it, and `live_signals` + its blocking check
judge the canary from those shadow answers through Dagster.

First the canary is another identity copy of the same bytes: its answers are production's, and it stays.
Then the canary is damaged on purpose (noise added to one layer of the tiny model, registered as another
version): its answers part from production's, the check rolls it back, and the trail says why. Both phases
land in the same hour; the check counts only the shadows of the version that is the canary when it runs.

The fleet (how versions are built, registered and signed off; the damage recipe) is `quant_pipeline_tests/fleet.py`,
shared with `e2e/test_live_rollback.py`, where the daemon's sensor requests the same check on its own.
"""

import datetime as dt
import time

import dagster as dg
import pytest

from quant_pipeline.defs.monitoring import canary_within_rollback_policy, live_key, live_signals
from quant_pipeline.defs.resources import MonitoringSettings
from quant_pipeline.release.canary import CANARY_ALIAS, CANARY_ROLLED_BACK
from quant_pipeline.release.signoff import verify_model_trail
from quant_pipeline.release.trail import read_entries
from quant_pipeline_tests.fleet import POLICY, REQUESTS, build_fleet, schema_items, serve_shadowed


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_llama):
    """The served fleet of `quant_pipeline_tests/fleet.py`: production, an identity twin, a damaged copy."""
    return build_fleet(tmp_path_factory.mktemp("served"), tiny_llama)


def monitor(fleet, instance, start: dt.datetime, policy):
    settings = MonitoringSettings(store_dir=str(fleet.store.root), rollback_policy_file=str(policy))
    return dg.materialize(
        [live_signals, canary_within_rollback_policy],
        partition_key=live_key(fleet.model, start),
        resources={"monitoring": settings, "mlflow": fleet.tracker},
        instance=instance,
        raise_on_error=False,
    )


def test_a_damaged_canary_is_rolled_back_from_its_shadow_answers_and_its_twin_is_not(fleet, tmp_path):
    f = fleet
    now = dt.datetime.now(dt.UTC)
    if now.minute == 59 and now.second > 20:  # both phases must land in one hour: wait for the next one
        time.sleep(61 - now.second)
    start = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    items = schema_items()  # JSON answers the server validates
    policy = tmp_path / "served-test.yaml"
    policy.write_text(POLICY)
    (tmp_path / "dagster").mkdir()
    with dg.instance_for_test(temp_dir=str(tmp_path / "dagster")) as instance:
        instance.add_dynamic_partitions("model", [f.model])

        serve_shadowed(f, f.twin[1], items[:REQUESTS])  # the same bytes as production: the same answers
        twin = monitor(f, instance, start, policy)
        (evaluation,) = twin.get_asset_check_evaluations()
        meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
        assert twin.success and evaluation.passed, meta["decision"]
        assert meta["canary_shadowed"] == REQUESTS and meta["canary_requests"] == 0
        identical = next(c for c in meta["criteria"] if c["name"] == "shadow_identical_min")
        assert identical["measurable"] and identical["estimate"] == 1.0
        assert str(f.tracker.alias_version(f.name, CANARY_ALIAS)) == f.twin[1]

        serve_shadowed(f, f.broken[1], items[REQUESTS : 2 * REQUESTS])  # noise in one layer
        broken = monitor(f, instance, start, policy)
        (evaluation,) = broken.get_asset_check_evaluations()
        meta = {k: getattr(v, "value", v) for k, v in evaluation.metadata.items()}
        assert not broken.success and not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert meta["canary_shadowed"] == REQUESTS  # the twin's shadows in this hour are not about this canary
        tripped = [(c["name"], c["source"]) for c in meta["criteria"] if c["tripped"]]
        assert ("shadow_identical_min", "shadow") in tripped, meta["decision"]
        assert meta["rolled_back"] == f"v{f.broken[1]} -> v{f.production[1]} (production)"
    assert str(f.tracker.alias_version(f.name, CANARY_ALIAS)) == f.production[1]
    last = read_entries(f.store.trail_path(f.name))[-1]
    assert (last["event"], last["registry_version"], last["artifact_id"]) == (CANARY_ROLLED_BACK, f.broken[1],
                                                                               f.broken[0])  # fmt: skip
    assert verify_model_trail(f.store, f.tracker, f.name) == []
    (materialization,) = broken.get_asset_materialization_events()
    signals = materialization.materialization.metadata["signals_json"].value
    assert signals["requests"] == 2 * REQUESTS and signals["arms"]["production"]["requests"] == 2 * REQUESTS
    served = signals["arms"]["production"]["validation_failure_rate"]  # the server's own schema checks, read back
    assert served["n"] == 2 * REQUESTS and signals["shadow"]["canary"]["pairs"] == 2 * REQUESTS
