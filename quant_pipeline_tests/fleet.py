"""A served fleet for the monitoring tests: the tiny Llama as a registered model with an identity candidate in
`production`, an identity twin and a copy damaged on purpose (noise on one layer), all approved, and the helpers
that serve golden prompts to it in shadow mode.

Versions are registered and signed off as `test_http_canary.py` does (reference-only pyfuncs, the sign-off
`Decision` appended to the anchored trail, aliases set in the registry): serving reads only that decision.
Shared by `integration/monitoring/test_served_canary.py` (the check materialized by the test) and
`e2e/test_live_rollback.py` (the daemon's sensor requests it, nobody else).
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

from safetensors.torch import load_file, save_file

from quant_pipeline.core.hashing import file_hashes, tree_hash
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.records import Decision
from quant_pipeline.core.runtime import fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.models.methods import precision, quantize
from quant_pipeline.monitoring.drift import GOLDEN_PROMPTS
from quant_pipeline.release.canary import CANARY_ALIAS
from quant_pipeline.release.reference import base_artifact_id, log_registered_pyfunc
from quant_pipeline.release.signoff import record_event
from quant_pipeline.serving import Server, ServingConfig
from quant_pipeline_tests.support import mlflow_db

IDENTITY = Recipe(method="identity", bits=8, group_size=-1)
REQUESTS = 20  # the test policy's min_requests_per_arm (serving costs ~1 s a request on two busy cores)
# Identical outputs clearly below 1 in 5 (the Wilson upper bound of 0/20 is 0.16) take the canary off; so do
# errors of the shadow runs. The shipped policy asks 50 requests per side, which would only make this slower.
POLICY = f"name: served-test\nmin_requests_per_arm: {REQUESTS}\nshadow_identical_min: 0.2\nerror_rate_excess: 0.02\n"
TOKENS = 4
DAMAGED_LAYER = "model.layers.0.mlp.down_proj.weight"


def damage_one_layer(model_dir: Path, out: Path, layer: str = DAMAGED_LAYER, scale: float = 30.0) -> Path:
    """A copy of the checkpoint with seeded noise (`scale` x the layer's std) added to one layer's weights."""
    import torch

    damaged = Path(shutil.copytree(model_dir, out))
    weights = next(damaged.glob("*.safetensors"))
    tensors = load_file(weights)
    torch.manual_seed(0)
    tensors[layer] = tensors[layer] + scale * tensors[layer].std() * torch.randn_like(tensors[layer])
    save_file(tensors, weights, metadata={"format": "pt"})
    return damaged


def build_fleet(root: Path, tiny_llama: Path, name: str = "tiny-served") -> SimpleNamespace:
    """The tiny Llama under a model name of its own (its folder's, which is its Dagster partition key) as the
    registered base; an identity candidate in `production`; an identity twin and a damaged copy, both approved.
    Store, MLflow database and artifacts all lie under `root`."""
    model_dir = Path(shutil.copytree(tiny_llama, root / name))
    store = ArtifactStore(root / "store")
    tracker = MlflowTracker(tracking_uri=mlflow_db(root), artifact_root=(root / "mlartifacts").as_uri())
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

    damaged = damage_one_layer(model_dir, root / "damaged")
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


def schema_items() -> list[dict]:
    """The golden prompts that declare a JSON schema: answers the server validates."""
    items = [json.loads(line) for line in GOLDEN_PROMPTS.read_text().splitlines() if line.strip()]
    return [item for item in items if item.get("schema")]


def serve_shadowed(fleet, canary_version: str, items: list[dict]) -> None:
    """Point `canary` at a version and serve the golden items in shadow mode, each with its declared schema."""
    fleet.tracker.set_alias(fleet.name, CANARY_ALIAS, canary_version)
    server = Server(fleet.tracker, fleet.name, "production", fleet.store.root, config=ServingConfig(mode="shadow"))
    for i, item in enumerate(items):
        server.generate(item["prompt"], max_new_tokens=TOKENS, seed=i, schema=item.get("schema"))
