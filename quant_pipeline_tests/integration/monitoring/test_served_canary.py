"""Live monitoring on traffic really served: `Server` in shadow mode answers from `production` (the tiny Llama,
an identity candidate) while the `canary` runs every prompt beside it, and `live_signals` + its blocking check
judge the canary from those shadow answers through Dagster.

First the canary is another identity copy of the same bytes: its answers are production's, and it stays.
Then the canary is damaged on purpose (noise added to one layer of the tiny model, registered as another
version): its answers part from production's, the check rolls it back, and the trail says why. Both phases
land in the same hour; the check counts only the shadows of the version that is the canary when it runs.

Versions are registered and signed off as `test_http_canary.py` does (reference-only pyfuncs, the sign-off
`Decision` appended to the anchored trail, aliases set in the registry): serving reads only that decision.
"""

import datetime as dt
import json
import shutil
import time
from types import SimpleNamespace

import dagster as dg
import pytest
from safetensors.torch import load_file, save_file

from quant_pipeline.core.hashing import file_hashes, tree_hash
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.records import Decision
from quant_pipeline.core.runtime import fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.monitoring import canary_within_rollback_policy, live_key, live_signals
from quant_pipeline.defs.resources import MonitoringSettings
from quant_pipeline.models.methods import precision, quantize
from quant_pipeline.monitoring.drift import GOLDEN_PROMPTS
from quant_pipeline.release.canary import CANARY_ALIAS, CANARY_ROLLED_BACK
from quant_pipeline.release.reference import base_artifact_id, log_registered_pyfunc
from quant_pipeline.release.signoff import record_event, verify_model_trail
from quant_pipeline.release.trail import read_entries
from quant_pipeline.serving import Server, ServingConfig

IDENTITY = Recipe(method="identity", bits=8, group_size=-1)
REQUESTS = 20  # per phase: the test policy's min_requests_per_arm (serving costs ~1 s a request on two busy cores)
# Identical outputs clearly below 1 in 5 (the Wilson upper bound of 0/20 is 0.16) take the canary off; so do
# errors of the shadow runs. The shipped policy asks 50 requests per side, which would only make this slower.
POLICY = "name: served-test\nmin_requests_per_arm: 20\nshadow_identical_min: 0.2\nerror_rate_excess: 0.02\n"
TOKENS = 4


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, tiny_llama):
    """The tiny Llama under a model name of its own (its folder's, which is its Dagster partition key) as the
    registered base; an identity candidate in `production`; an identity twin and a damaged copy, both approved."""
    root = tmp_path_factory.mktemp("served")
    model_dir = shutil.copytree(tiny_llama, root / "tiny-served")
    name = model_dir.name
    store = ArtifactStore(root / "store")
    tracker = MlflowTracker(tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_root=(root / "mlartifacts").as_uri())
    base_hash, runtime_hash = tree_hash(file_hashes(model_dir)), fingerprint_hash(runtime_fingerprint())

    def register(source_dir, aid: str, kind: str) -> tuple[str, str]:
        out = store.artifact_dir(aid)
        out.mkdir(parents=True)
        quantize(source_dir, [], IDENTITY, out)
        record = {"artifact_id": aid, "model_name": name, "kind": kind, "recipe": IDENTITY.as_dict(),
                  "base_hash": base_hash, "runtime_hash": runtime_hash, "precision": precision(IDENTITY)}  # fmt: skip
        content_hash = tree_hash(file_hashes(out))
        with tracker.stage_run(name, f"register {aid}") as run:
            logged = log_registered_pyfunc(run.client, run.run_id, out, record, store_dir=store.root)
            tags = {"kind": kind, "artifact_id": aid, "content_hash": content_hash}
            version = str(tracker.register_artifact(name, aid, logged, run.run_id, tags))
        decision = Decision(event="approved", artifact_id=aid, registry_version=version, by="Ada Lovelace",
                            content_hash=content_hash, note="monitoring tests")  # fmt: skip
        record_event(store, tracker, name, decision.model_dump(mode="json"))
        return aid, version

    damaged = shutil.copytree(model_dir, root / "damaged")  # one layer of the weights, noised
    weights = next(damaged.glob("*.safetensors"))
    tensors = load_file(weights)
    layer = "model.layers.0.mlp.down_proj.weight"
    tensors[layer] = tensors[layer] + 30.0 * tensors[layer].std() * torch_randn_like(tensors[layer])
    save_file(tensors, weights, metadata={"format": "pt"})
    with tracker.stage_run(name, "register base") as run:
        base_ref = log_registered_pyfunc(run.client, run.run_id, model_dir, {"kind": "base", "model_name": name},
                                         store_dir=store.root)  # fmt: skip
        tags = {"kind": "base", "artifact_id": base_artifact_id(base_hash), "content_hash": base_hash}
        tracker.register_artifact(name, base_artifact_id(base_hash), base_ref, run.run_id, tags)
    production = register(model_dir, f"identity-{base_hash[:12]}", "quantized")
    twin = register(model_dir, f"identity-twin-{base_hash[:12]}", "quantized")
    broken = register(damaged, f"identity-damaged-{base_hash[:12]}", "quantized")
    tracker.set_alias(name, "production", production[1])
    return SimpleNamespace(model=str(model_dir), name=name, store=store, tracker=tracker, production=production,
                           twin=twin, broken=broken)  # fmt: skip


def torch_randn_like(tensor):
    import torch

    torch.manual_seed(0)
    return torch.randn_like(tensor)


def serve_shadowed(fleet, canary_version: str, items: list[dict]) -> None:
    """Point `canary` at a version and serve the golden items in shadow mode, each with its declared schema."""
    fleet.tracker.set_alias(fleet.name, CANARY_ALIAS, canary_version)
    server = Server(fleet.tracker, fleet.name, "production", fleet.store.root, config=ServingConfig(mode="shadow"))
    for i, item in enumerate(items):
        server.generate(item["prompt"], max_new_tokens=TOKENS, seed=i, schema=item.get("schema"))


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
    items = [json.loads(line) for line in GOLDEN_PROMPTS.read_text().splitlines() if line.strip()]
    items = [item for item in items if item.get("schema")]  # JSON answers the server validates
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
