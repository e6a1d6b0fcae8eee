"""The audit's inputs: the base checkpoint, the calibration set and the runtime it all runs on.

- base_checkpoint: whatever the model source (the shipped GGUF, a local Hugging Face directory, a
  hub id), one local safetensors checkpoint with a content hash: the base model's identity in every
  record, and the kept baseline (comparison and rollback path), registered as a version of its own.
- calibration_set: calibration data shapes the rounding error as much as the recipe does, so it is
  an audited input: validated line by line, hashed, summarised in tokens of the model.
- runtime_environment: the same artifact can behave differently after a torch, kernel or hardware
  change; so the runtime is an input of every artifact ID, and its fingerprint is recorded.
"""

import json
from pathlib import Path

import dagster as dg

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.perf import StageMeter
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.runtime import fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import MODEL_TAG, MODELS, PARTITION_TAG, context_model, stage_run
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.models.calibration import load_calibration_texts, token_stats
from quant_pipeline.models.checkpoint import describe_checkpoint, materialize_checkpoint, source_version
from quant_pipeline.models.identity import architecture_of, check_same_architecture
from quant_pipeline.release.governing import base_architecture
from quant_pipeline.release.reference import base_artifact_id, log_registered_pyfunc


@dg.asset(group_name="audit", kinds={"pytorch", "huggingface"}, partitions_def=MODELS)
def base_checkpoint(
    context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker
) -> dg.MaterializeResult:
    """The full-precision model under audit, as a hashed local safetensors checkpoint (kept baseline)."""
    with StageMeter() as meter:
        source = settings.source(context_model(context), context.instance)
        path = materialize_checkpoint(source, settings.store)
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        # again here, on the checkpoint itself: a run that skipped the pre-run check registers nothing foreign
        previous = base_architecture(settings.store, source.name)
        check_same_architecture(source.name, previous, config, settings.new_base_version)
        record = {
            "model_name": source.name,
            "source": source.__dict__,
            "source_version": source_version(source),
            **describe_checkpoint(path),
            "base_architecture": architecture_of(config).model_dump(),
            "new_base_version": previous is not None and previous != architecture_of(config),
        }
    record["perf"] = meter.metadata()
    description = (
        f"Full-precision base of {source.name} (kind=base): the baseline every quantized candidate of it is judged "
        f"against, and the rollback target. Checkpoint {path} ({record['dtype']}, {record['num_parameters']:,} "
        f"parameters), content hash {record['hash'][:16]}, source {record['source_version']}."
    )
    with stage_run(context, mlflow, meter, source.name, "base_checkpoint", base_hash=record["hash"]) as run:
        run.log_params({k: record[k] for k in ("path", "hash", "architecture", "num_parameters", "dtype")})
        run.log_metrics({"size_bytes": record["size_bytes"], **meter.metadata()})
        run.log_json(record, "base_checkpoint.json")
        # The kept baseline is a registry version too: the rollback target and the critical-request route.
        source_uri = log_registered_pyfunc(
            run.client, run.run_id, path, record, settings.store.root, bundle_weights=mlflow.is_server
        )
        version = mlflow.register_artifact(source.name, base_artifact_id(record["hash"]), source_uri, run.run_id, {
            "kind": "base", "artifact_id": base_artifact_id(record["hash"]), "content_hash": record["hash"],
            "base_hash": record["hash"], "source_version": record["source_version"], "dtype": record["dtype"],
        }, description)  # fmt: skip
    record["registry_version"] = version
    return dg.MaterializeResult(
        value=record,
        data_version=dg.DataVersion(record["hash"][:16]),
        metadata={
            "model": source.name,
            "source_version": record["source_version"],
            "path": dg.MetadataValue.path(str(path)),
            "checkpoint_dir": dg.MetadataValue.path(str(path)),  # `path` may show the IO manager's pickle instead
            "content_hash": record["hash"],
            "architecture": record["architecture"],
            "num_parameters": record["num_parameters"],
            "dtype": record["dtype"],
            "size_mb": round(record["size_bytes"] / 2**20, 1),
            "registry": f"{source.name} v{version} (base)",
            **meter.metadata(),
            **run.metadata(),
        },
    )


@dg.asset(group_name="audit", kinds={"json"}, partitions_def=MODELS)
def calibration_set(
    context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, base_checkpoint: dict
) -> dg.MaterializeResult:
    """The validated, hashed calibration texts and their token statistics under the base tokenizer (all of
    them, at the default sequence length: which samples a candidate reads is its recipe's business)."""
    from transformers import AutoTokenizer  # heavy: only when the stage runs

    path = Path(settings.calibration_file)
    with StageMeter() as meter:
        texts = load_calibration_texts(path)  # each candidate checks it has the samples its recipe reads
        tokenizer = AutoTokenizer.from_pretrained(base_checkpoint["path"])
        stats = token_stats(texts, tokenizer, Recipe().seq_len)
    record = {
        "path": str(path.resolve()),
        "hash": sha256_file(path),
        "count": len(texts),
        **stats,
        "perf": meter.metadata(),
    }
    with stage_run(
        context, mlflow, meter, base_checkpoint["model_name"], "calibration_set", calibration_hash=record["hash"]
    ) as run:
        run.log_params({"path": record["path"], "hash": record["hash"], "count": record["count"]})
        run.log_metrics({**stats, **meter.metadata()})
    return dg.MaterializeResult(
        value=record,
        data_version=dg.DataVersion(record["hash"][:16]),
        metadata={
            "path": dg.MetadataValue.path(record["path"]),
            "content_hash": record["hash"],
            "version": f"{path.name}@{record['hash'][:16]}",
            "samples": record["count"],
            **stats,
            **meter.metadata(),
            **run.metadata(),
        },
    )


@dg.asset(group_name="audit", kinds={"python"})
def runtime_environment(
    context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker
) -> dg.MaterializeResult:
    """The fingerprint of the software and hardware this audit runs on (logged in the experiment of the model
    whose audit run materializes it; not partitioned itself, so materialized alone it logs nowhere)."""
    with StageMeter() as meter:
        fp = runtime_fingerprint()
        digest = fingerprint_hash(fp)
    run_metadata: dict = {}
    model = context.run.tags.get(MODEL_TAG) or context.run.tags.get(PARTITION_TAG)
    try:
        model_name = settings.source(model, context.instance).name if model else None
    except AuditInputError:
        model_name = None  # a model key naming nothing fails its own stages, not this one
    if model_name:
        with stage_run(context, mlflow, meter, model_name, "runtime_environment", runtime_hash=digest) as run:
            run.log_params({"python": fp["python"], "cpu": fp["cpu"]["model"], **fp["libraries"]})
            run.log_metrics(meter.metadata())
            run.log_json(fp, "runtime_fingerprint.json")
        run_metadata = run.metadata()
    return dg.MaterializeResult(
        value={"fingerprint": fp, "hash": digest},
        data_version=dg.DataVersion(digest[:16]),
        metadata={
            "fingerprint_hash": digest,
            "python": fp["python"],
            **{f"lib/{k}": v for k, v in fp["libraries"].items()},
            "cpu": fp["cpu"]["model"],
            "cpu_isa": ", ".join(fp["cpu"]["isa"]),
            "gpu": (fp["gpu"] or {}).get("name", "none"),
            "fingerprint": dg.MetadataValue.json(fp),
            **meter.metadata(),
            **run_metadata,
        },
    )
