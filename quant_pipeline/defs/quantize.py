"""The quantized artifact: the recipe's method on the base checkpoint (and the calibration set, for GPTQ),
registered in MLflow.

The artifact ID is derived from everything that determines the bytes (base hash, recipe, the calibration
samples the recipe reads, runtime fingerprint) and the registered model it belongs to, so the same inputs give
the same ID and the work is reused, and any changed input gives a new ID that starts its approval from scratch
(unless its bytes are those of an approved artifact: `release.carry`).
The artifact is written atomically and carries a record of its inputs and its own file hashes.
"""

import json
from pathlib import Path

import dagster as dg

from quant_pipeline.core.artifacts import verify_artifact
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import RECORD_FILE, dir_size, file_hashes, sha256_file, tree_hash
from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.progress import log_progress
from quant_pipeline.core.recipe import Recipe, candidate_key
from quant_pipeline.core.records import ArtifactRecord
from quant_pipeline.core.store import atomic_directory
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import AUDITS, candidate_recipe, stage_run
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.models.calibration import (
    check_enough_samples,
    load_calibration_texts,
    tokenizer_hash,
    used_samples_hash,
)
from quant_pipeline.models.methods import artifact_id, precision, quantize, scale_summary
from quant_pipeline.release.reference import log_registered_pyfunc
from quant_pipeline.release.signoff import record_event


@dg.asset(group_name="audit", kinds={"pytorch", "gptq", "torchao"}, partitions_def=AUDITS)
def quantized_artifact(
    context: dg.AssetExecutionContext,
    settings: AuditSettings,
    mlflow: MlflowTracker,
    base_checkpoint: dict,
    calibration_set: dict,
    runtime_environment: dict,
) -> dg.MaterializeResult:
    """The candidate made with the recipe's method (GPTQ, torchao, or identity: `models/methods.py`), saved
    atomically under an input-derived ID and registered in MLflow."""
    recipe = candidate_recipe(context)
    model_name = base_checkpoint["model_name"]
    # a calibrated artifact's ID names the samples it reads (not the file): an unused line edited changes nothing
    texts = validated_texts(calibration_set, recipe) if recipe.calibrated else None
    used = used_samples_hash(texts, recipe, tokenizer_hash(base_checkpoint["files"])) if texts is not None else None
    where = settings.placement
    aid = artifact_id(
        base_checkpoint["hash"], recipe, used, runtime_environment["hash"], model_name=model_name, where=where
    )
    store = settings.store
    target = store.artifact_dir(aid)
    reused = target.exists()
    passes: dict = {}
    with StageMeter() as meter:
        if not reused:
            if texts is None:  # every method but identity measures its layers' sensitivity on it
                texts = validated_texts(calibration_set, recipe) if recipe.method != "identity" else []
            with atomic_directory(target) as tmp, log_progress(context.log.info):
                passes = quantize(Path(base_checkpoint["path"]), texts, recipe, tmp, where)
                sensitivity = passes.pop("layer_sensitivity", {})
                files = file_hashes(tmp)
                record = ArtifactRecord(
                    artifact_id=aid,
                    model_name=model_name,
                    base_hash=base_checkpoint["hash"],
                    base_path=base_checkpoint["path"],
                    recipe=recipe.as_dict(),
                    calibration_hash=used,
                    calibration_file_hash=calibration_set["hash"] if recipe.calibrated else None,
                    calibration_count=min(len(texts), recipe.calibration_samples) if recipe.calibrated else 0,
                    runtime_hash=runtime_environment["hash"],
                    runtime=runtime_environment["fingerprint"],
                    precision=precision(recipe),
                    layer_sensitivity=sensitivity,
                    sensitivity_calibration_hash=calibration_set["hash"] if sensitivity else None,
                    scales=scale_summary(tmp),
                    files=files,
                    content_hash=tree_hash(files),
                    size_bytes=dir_size(tmp),
                    dagster_run_id=context.run.run_id,
                )
                record.write(tmp / RECORD_FILE)
        record = verify_artifact(store, aid).dump()
    if record["model_name"] != model_name:  # the ID names the model: only a hand-made folder gets here
        raise AuditInputError(
            f"artifact {aid} in the store records model {record['model_name']!r}, not {model_name!r}: it was not "
            "written by this audit; move it away and re-run"
        )
    tags = {
        "artifact_id": aid,
        "content_hash": record["content_hash"],
        "base_hash": record["base_hash"],
        "calibration_hash": record["calibration_hash"] or "none (data-free method)",
        "calibration_file_hash": record.get("calibration_file_hash") or "none",
        "runtime_hash": record["runtime_hash"],
        "recipe": json.dumps(record["recipe"], sort_keys=True),
        "approval": "pending sign-off",
        "kind": "quantized",
    }
    with stage_run(context, mlflow, meter, model_name, "quantized_artifact", artifact_id=aid) as run:
        run.log_params({**record["recipe"], "artifact_id": aid, "content_hash": record["content_hash"]})
        run.log_metrics(
            {"size_bytes": record["size_bytes"], "base_size_bytes": base_checkpoint["size_bytes"], **meter.metadata()}
        )
        run.log_json(
            {k: v for k, v in record.items() if k != "scales"} | {"scales_hash": record["scales"]["hash"]},
            "artifact_record.json",
        )
        run.log_json(record["scales"], "scales_summary.json")
        # The version is an MLflow pyfunc that points at (and re-verifies) these exact bytes:
        # `mlflow models serve -m models:/<name>@production` serves it.
        source = log_registered_pyfunc(
            run.client, run.run_id, target, record, store.root, bundle_weights=mlflow.is_server
        )
        version = mlflow.register_artifact(model_name, aid, source, run.run_id, tags, describe_artifact(record, recipe))
    trigger = {k.split("/", 1)[1]: v for k, v in context.run.tags.items() if k.startswith("quant_pipeline/")}
    record_event(store, mlflow, model_name, {
        "event": "audit", "artifact_id": aid, "registry_version": version, "reused": reused,
        "trigger": trigger.get("trigger", "manual"), "from_version": trigger.get("from_version"),
        "to_version": trigger.get("to_version"), "changes": trigger.get("changes"),
        "content_hash": record["content_hash"], "base_hash": record["base_hash"],
        "calibration_hash": record["calibration_hash"], "runtime_hash": record["runtime_hash"],
        # the file this audit read (a reused artifact's record names the one it was built from)
        "calibration_file_hash": calibration_set["hash"] if recipe.calibrated else None,
        "recipe": record["recipe"], "dagster_run_id": context.run.run_id,
        # what the model's name stands for: a later checkpoint of another architecture is refused under it
        "base_architecture": base_checkpoint.get("base_architecture"),
        "new_base_version": base_checkpoint.get("new_base_version", False),
    })  # fmt: skip
    return dg.MaterializeResult(
        value={
            **{k: v for k, v in record.items() if k not in ("files", "scales", "runtime")},
            "path": str(target),
            "registry_version": version,
            "reused": reused,
            "base_size_bytes": base_checkpoint["size_bytes"],
        },
        data_version=dg.DataVersion(record["content_hash"][:16]),
        metadata={
            "artifact_id": aid,
            "path": dg.MetadataValue.path(str(target)),
            "artifact_dir": dg.MetadataValue.path(str(target)),  # `path` may show the IO manager's pickle instead
            "content_hash": record["content_hash"],
            "reused_existing_artifact": reused,
            "recipe": dg.MetadataValue.json(record["recipe"]),
            "size_mb": round(record["size_bytes"] / 2**20, 1),
            "size_vs_base": round(record["size_bytes"] / base_checkpoint["size_bytes"], 3),
            "scales_hash": record["scales"]["hash"],
            "layer_sensitivity": dg.MetadataValue.json(record.get("layer_sensitivity") or {}),
            "registry": f"{model_name} v{version}",
            **passes,
            **meter.metadata(),
            **run.metadata(),
        },
    )


def describe_artifact(record: dict, recipe: Recipe) -> str:
    """What a quantized registry version is, in a sentence for its registry page (the verdict follows once the
    gate has judged it: `defs.gate.delta_report`)."""
    return (
        f"Quantized candidate {candidate_key(recipe)} of {record['model_name']} (kind=quantized): artifact "
        f"{record['artifact_id']}, recipe {json.dumps(record['recipe'], sort_keys=True)}, "
        f"content hash {record['content_hash'][:16]}, {record['size_bytes'] / 2**20:.1f} MB, from base "
        f"{record['base_hash'][:16]}."
    )


def validated_texts(calibration_set: dict, recipe: Recipe) -> list[str]:
    """The calibration texts, refused if the file changed since calibration_set validated it (its hash is what
    the audit records) or if it has fewer samples than a calibrated recipe reads."""
    path = Path(calibration_set["path"])
    if sha256_file(path) != calibration_set["hash"]:
        raise AuditInputError(f"calibration file {path} changed since it was validated: re-materialize calibration_set")
    texts = load_calibration_texts(path)
    if recipe.calibrated:
        check_enough_samples(texts, path, recipe)
    return texts
