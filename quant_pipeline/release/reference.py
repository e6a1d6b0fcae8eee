"""What a registered version carries instead of the weights: a reference to verified bytes.

The registered version is a small MLflow pyfunc whose artifact is a reference to the checkpoint
directory and its per-file hashes; every load re-hashes the directory against that reference and
refuses to load bytes that differ, naming each file. On a tracking server the pyfunc carries the
weights too (`bundled`): the server is then the system of record, and a host that never ran the
audit fetches them into its own store, a cache, and verifies them against the reference (whose
content hash the registry version's tags hold) before use. The pyfunc is logged from
code (`serving/pyfunc_entry.py`, by path), so registering a version never imports the serving
package: dependencies point from serving to release, not back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import mlflow.pyfunc
from mlflow.tracking import MlflowClient

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import file_hashes, tree_hash
from quant_pipeline.core.paths import PACKAGE_DIR
from quant_pipeline.core.store import verify_tree

REF_FILE = "artifact_ref.json"
WEIGHTS = "weights"  # where a bundled pyfunc keeps the checkpoint's files, under its artifacts/
REF_SCHEMA = "quant_pipeline.artifact_ref/1"
PYFUNC_ARTIFACT_PATH = "model"
PYFUNC_CODE = PACKAGE_DIR / "serving" / "pyfunc_entry.py"


class ServingError(AuditInputError):
    """A model that must not be served, or a request that cannot be reproduced (the message says why)."""


def base_artifact_id(base_hash: str) -> str:
    return f"base-{base_hash[:12]}"


def build_ref(model_dir: Path, record: dict, store_dir: Path | None = None) -> dict:
    """The small JSON a registered version carries instead of the weights: where the checkpoint
    lies, its per-file hashes, and the provenance of those bytes.

    `record` is a quantized artifact's record (`content_hash`, `recipe`, ...) or a base
    checkpoint's record (`hash` instead of `content_hash`, no recipe)."""
    model_dir = Path(model_dir).resolve()
    files = record.get("files") or file_hashes(model_dir)
    content_hash = record.get("content_hash") or record.get("hash") or tree_hash(files)
    if tree_hash(files) != content_hash:
        raise ServingError(
            f"record for {model_dir} is inconsistent: "
            f"its per-file hashes do not add up to its content hash {content_hash[:12]}"
        )
    kind = record.get("kind") or ("quantized" if record.get("recipe") else "base")
    if store_dir is None and model_dir.parent.name == "artifacts":  # an artifact inside a store
        store_dir = model_dir.parent.parent
    return {
        "schema": REF_SCHEMA,
        "artifact_id": record.get("artifact_id") or base_artifact_id(content_hash),
        "kind": kind,
        "model_name": record.get("model_name") or (record.get("source") or {}).get("name") or model_dir.name,
        "model_dir": str(model_dir),
        "content_hash": content_hash,
        "files": dict(sorted(files.items())),
        "base_hash": record.get("base_hash") or (content_hash if kind == "base" else None),
        "base_path": record.get("base_path"),
        "recipe": record.get("recipe"),
        "calibration_hash": record.get("calibration_hash"),
        "runtime_hash": record.get("runtime_hash"),
        "runtime": record.get("runtime"),
        "precision": record.get("precision")
        or (f"{record['dtype']} (full precision)" if record.get("dtype") else None),
        "store_dir": str(Path(store_dir).resolve()) if store_dir else None,
    }


def check_consistent(ref: dict) -> None:
    """The reference's file hashes must add up to its content hash (the registry's): files checked against a
    list that does not are checked against nothing anybody signed."""
    if tree_hash(ref["files"]) != ref["content_hash"]:
        raise ServingError(
            f"reference of {ref['artifact_id']} is inconsistent: its file hashes do not add up to "
            f"content hash {ref['content_hash'][:12]}"
        )


def verify_ref(ref: dict) -> None:
    """Re-hash the checkpoint directory against the reference; raise naming every differing file."""
    directory = Path(ref["model_dir"])
    check_consistent(ref)
    if not directory.is_dir():
        raise ServingError(f"refusing to load {ref['artifact_id']}: its directory {directory} is missing")
    problems = verify_tree(directory, ref["files"])
    if problems:
        raise ServingError(
            f"refusing to load {ref['artifact_id']} from {directory}: "
            f"files differ from the registered hashes: {'; '.join(problems)}"
        )


def _named(tmp: Path, ref: dict) -> Path:
    """The checkpoint under the name the pyfunc keeps it by (MLflow copies an artifact folder under its own name
    and refuses a symlink): hard links where the filesystem allows, copies elsewhere."""

    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    return Path(shutil.copytree(ref["model_dir"], tmp / WEIGHTS, copy_function=link_or_copy))


def log_registered_pyfunc(
    client: MlflowClient,
    run_id: str,
    model_dir: Path,
    record: dict,
    store_dir: Path | None = None,
    artifact_path: str = PYFUNC_ARTIFACT_PATH,
    bundle_weights: bool = False,
) -> str:
    """Log a `QuantizedLLM` pyfunc under the run; return the source URI to register (`<run artifact_uri>/model`).
    It holds the reference, and with ``bundle_weights`` the checkpoint's files as well. The directory must
    match the record right now. One pyfunc per run and artifact path: a second would merge into the first."""
    ref = build_ref(model_dir, record, store_dir)
    verify_ref(ref)
    ref["bundled"] = WEIGHTS if bundle_weights else None
    if client.list_artifacts(run_id, artifact_path):
        raise ServingError(
            f"run {run_id} already holds a model at `{artifact_path}`: "
            "log each registered version from its own run or artifact_path"
        )
    with tempfile.TemporaryDirectory() as tmp:
        ref_path = Path(tmp) / REF_FILE
        ref_path.write_text(json.dumps(ref, indent=2, sort_keys=True))
        saved = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(saved),
            python_model=str(PYFUNC_CODE),  # models from code: registering never imports serving
            artifacts={
                "artifact_ref": str(ref_path),
                **({WEIGHTS: str(_named(Path(tmp), ref))} if bundle_weights else {}),
            },
            code_paths=None,
            pip_requirements=[],  # served with --env-manager local: no pip inference (it would load the model)
            metadata={
                "quant_pipeline_artifact_id": ref["artifact_id"],
                "quant_pipeline_kind": ref["kind"],
                "content_hash": ref["content_hash"],
            },
        )
        client.log_artifacts(run_id, str(saved), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri.rstrip('/')}/{artifact_path}"
