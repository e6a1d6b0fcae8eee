"""`quant-pipeline pull MODEL`: rebuild this host's store of one model from the tracking server.

The records come through `release.rebuild` (each file checked against the verified trail); the weights of every
registered version through the serving resolver, which keeps a bundled version only if its files hash as the
reference the registry's content hash names. Exit 0 when everything the trail and the registry name is here and
verified, 1 when something was refused or the server holds no copy of it (the list says which), 2 bad input.
"""

from __future__ import annotations

from pathlib import Path

from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.release.rebuild import KINDS, Pulled, rebuild_records
from quant_pipeline.release.reference import ServingError
from quant_pipeline.serving.resolver import ModelResolver, ensure_verified


def pull_weights(store: ArtifactStore, tracker: MlflowTracker, model_name: str, versions: list, pulled: Pulled) -> None:
    """Every registered version's files, fetched where this store lacks them and verified either way."""
    resolver = ModelResolver(tracker, model_name, store)
    for mv in versions:
        what = f"v{mv.version} weights ({mv.tags.get('artifact_id', '?')})"
        try:
            ref = resolver.for_version(mv).ref
            if not ref.get("fetch_from") and not Path(ref["model_dir"]).is_dir():
                pulled.add("missing", f"{what}: registered without its files on the server ({ref['model_dir']})")
            else:
                pulled.add("fetched" if ensure_verified(ref) else "present", what)
        except ServingError as e:
            pulled.add("refused", f"{what}: {e}")


def write_boms(store: ArtifactStore, versions: list, pulled: Pulled) -> None:
    """Each quantized version's ML-BOM, written here from the verified records and weights (never downloaded)."""
    from quant_pipeline.core.errors import AuditInputError
    from quant_pipeline.release.registry import write_bom

    quantized = {v.tags.get("artifact_id") for v in versions if v.tags.get("kind") == "quantized"}
    for aid in sorted(quantized - {None}):
        if not store.artifact_record_path(aid).is_file():
            continue  # refused or missing above: said there
        try:
            pulled.add("written", f"ML-BOM of {aid}: {write_bom(store, aid)}")
        except AuditInputError as e:
            pulled.add("missing", f"ML-BOM of {aid}: {e}")


def pull_model(store: ArtifactStore, tracker: MlflowTracker, model_name: str, weights: bool = True) -> int:
    pulled = rebuild_records(store, tracker, model_name)
    if weights:
        versions = tracker.client().search_model_versions(f"name='{model_name}'")
        versions = sorted(versions, key=lambda v: int(v.version))
        pull_weights(store, tracker, model_name, versions, pulled)
        write_boms(store, versions, pulled)
    counts = ", ".join(f"{pulled.count(kind)} {kind}" for kind in KINDS)
    print(f"{model_name} from {tracker.uri} into {store.root}: {counts}")
    for kind, what in pulled.lines:
        print(f"  {kind.upper():8} {what}")
    if not pulled.ok:
        print(f"{model_name}: NOT fully rebuilt: what was refused or missing was not kept (the lines above say which)")
    return 0 if pulled.ok else 1
