"""From a name to verified bytes: registry version, artifact ID, alias or `base` -> a checked reference.

What gets served is resolved through the MLflow registry. The reference a version carries is
cross-checked against the version's tags, and every file is re-hashed before a model is loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

import mlflow
from mlflow.exceptions import MlflowException

from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.hashing import RECORD_FILE, file_hashes, tree_hash
from quant_pipeline.core.store import ArtifactStore, StoreError, atomic_directory, check_name, verify_tree
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline.models.placement import placement
from quant_pipeline.release import shared_trail
from quant_pipeline.release.reference import REF_FILE, ServingError, build_ref, check_consistent, verify_ref
from quant_pipeline.release.signoff import decisions

BASE_REF = "base"


def is_safe_name(name: str) -> bool:
    try:
        check_name(name)
    except StoreError:
        return False
    return True


@dataclass(frozen=True)
class Resolved:
    version: str | None
    ref: dict

    @property
    def artifact_id(self) -> str:
        return self.ref["artifact_id"]

    @property
    def kind(self) -> str:
        return self.ref["kind"]


class ModelResolver:
    """Registry version (or artifact ID, or alias) -> the version's reference, cross-checked."""

    def __init__(self, tracker: MlflowTracker, model_name: str, store_dir: ArtifactStore | Path, known_refs=()):
        self.tracker, self.model_name, self.store = (
            tracker,
            check_name(model_name, "model name"),
            ArtifactStore.of(store_dir),
        )
        self.client = tracker.client()
        self.known = {r["artifact_id"]: r for r in known_refs}

    def alias_version(self, alias: str):
        return self.tracker.alias_model_version(self.model_name, alias)

    def version_of(self, artifact_id: str):
        return self.tracker.model_version(self.model_name, artifact_id)

    def base_version(self, base_hash: str | None):
        return self.tracker.base_model_version(self.model_name, base_hash)

    def resolve(self, ref: str) -> tuple[Resolved, str | None]:
        """(what `ref` names now, the alias followed or None)."""
        if ref == BASE_REF:
            mv = self.base_version(None)
            if mv is None:
                known = [r for r in self.known.values() if r["kind"] == "base"]
                if known:
                    return Resolved(None, known[0]), None
                raise ServingError(f"{self.model_name} has no registered base version (tag kind=base) to serve")
            return self.for_version(mv), None
        mv = self.version_of(ref)
        if mv is not None:
            return self.for_version(mv), None
        if ref in self.known or (is_safe_name(ref) and self.store.artifact_record_path(ref).exists()):
            return Resolved(None, self.ref_for_artifact(ref)), None
        mv = self.alias_version(ref)
        if mv is not None:
            return self.for_version(mv), ref
        if re.fullmatch(r"v?\d+", ref):  # a registry version number, pinned
            try:
                return self.for_version(self.client.get_model_version(self.model_name, ref.lstrip("v"))), None
            except MlflowException:
                pass
        raise ServingError(
            f"{self.model_name}: `{ref}` is neither a registered artifact ID, an alias (approved, production), "
            "a version number nor `base`"
        )

    def ref_for_artifact(self, artifact_id: str) -> dict:
        """An artifact's reference: via its registry version, else from its record in the store."""
        mv = self.version_of(artifact_id)
        if mv is not None:
            return self.for_version(mv).ref
        if artifact_id in self.known:
            return self.known[artifact_id]
        if self.store.artifact_record_path(artifact_id).exists():
            record = read_artifact_record(self.store, artifact_id)
            return build_ref(self.store.artifact_dir(artifact_id), record.dump(), self.store.root)
        raise ServingError(
            f"artifact {artifact_id} is neither registered for {self.model_name} nor in {self.store.root / 'artifacts'}"
        )

    def for_version(self, mv) -> Resolved:
        """The reference a version carries (its pyfunc's artifact_ref.json; for a version registered
        with a plain directory source, the directory's record), checked against the version's tags."""
        tags = dict(mv.tags)
        aid = tags.get("artifact_id")
        ref = self.known.get(aid) or self._download_ref(mv.source) or self._ref_from_directory(mv, tags)
        for key in ("artifact_id", "content_hash"):
            if tags.get(key) and tags[key] != ref[key]:
                raise ServingError(
                    f"{self.model_name} v{mv.version}: registry tag {key}={tags[key][:16]} "
                    f"but its reference says {ref[key][:16]}: refusing to serve"
                )
        # audited elsewhere (its folder is another host's store): fetched into our store, the cache, and read there
        if ref.get("bundled") and not self.store.contains(Path(ref["model_dir"])):
            ref = {
                **ref,
                "model_dir": str(self.store.artifact_dir(ref["artifact_id"])),
                "fetch_from": f"{mv.source.rstrip('/')}/artifacts/{ref['bundled']}",
                "tracking_uri": self.tracker.uri,
            }
        # this host's copy of the trail (the sign-off record) brought up to the anchor, where a server shares it
        shared_trail.catch_up(self.tracker, self.model_name, self.store.trail_path(self.model_name))
        return Resolved(str(mv.version), ref)

    def _download_ref(self, source: str) -> dict | None:
        parsed = urlparse(source)
        if parsed.scheme == "file":  # a local artifact store: read in place
            path = Path(unquote(parsed.path)) / "artifacts" / REF_FILE
            return json.loads(path.read_text()) if path.is_file() else None
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{source.rstrip('/')}/artifacts/{REF_FILE}",
                    dst_path=tmp,
                    tracking_uri=self.tracker.uri,
                )
            except Exception:  # not a quant_pipeline pyfunc (a plain checkpoint directory was registered)
                return None
            return json.loads(Path(local).read_text())

    def _ref_from_directory(self, mv, tags: dict) -> dict:
        parsed = urlparse(mv.source)
        directory = Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else None
        if directory is None or not directory.is_dir():
            raise ServingError(
                f"{self.model_name} v{mv.version}: source {mv.source} "
                "is neither a quant_pipeline pyfunc nor a local checkpoint directory"
            )
        record_path = directory / RECORD_FILE
        record = json.loads(record_path.read_text()) if record_path.exists() else {}
        if not record.get("files"):  # a user's own checkpoint: only the registry's content hash to check against
            files = file_hashes(directory)
            if tags.get("content_hash") and tree_hash(files) != tags["content_hash"]:
                raise ServingError(
                    f"refusing to load {tags.get('artifact_id', directory.name)} from {directory}: "
                    "its files no longer match the "
                    f"registered content hash {tags['content_hash'][:16]} "
                    "(no per-file record to name which; re-register it with log_registered_pyfunc)"
                )
            record = {**record, "files": files, "content_hash": tags.get("content_hash")}
        record = {
            "model_name": self.model_name,
            "kind": tags.get("kind"),
            **{k: v for k, v in record.items() if v is not None},
        }
        return build_ref(directory, record, self.store.root)


class AliasWatch:
    """An alias other than the served ref (the canary), re-read before every request: which version it
    names now, that version's checked reference (cached per version: a version's source never changes),
    and whether it moved since the last request. Thread-safe; a move is reported to one request only."""

    def __init__(self, resolver: ModelResolver, alias: str):
        self.resolver, self.alias = resolver, check_name(alias, "alias")
        self.seen: str | None = None  # the version the alias named at the last look
        self._targets: dict[str, Resolved] = {}
        self._lock = threading.Lock()

    def follow(self) -> tuple[str | None, Resolved | None, str | None, str | None]:
        """(version the alias names or None, its reference or None, why it has none, the move: "v3->v5",
        "v5->none", or None when it did not move)."""
        mv = self.resolver.alias_version(self.alias)
        version = None if mv is None else str(mv.version)
        target, problem = None, None
        if mv is not None:
            with self._lock:
                target = self._targets.get(version)
            if target is None:
                try:
                    target = self.resolver.for_version(mv)
                except ServingError as e:  # its registry tags disagree with its reference
                    problem = str(e)
                else:
                    with self._lock:
                        self._targets[version] = target
        with self._lock:
            old, self.seen = self.seen, version
        moved = None if old == version else f"{_v(old)}->{_v(version)}"
        return version, target, problem, moved


def _v(version: str | None) -> str:
    return "none" if version is None else f"v{version}"


def unapproved_reason(store: ArtifactStore, model_name: str, ref: dict) -> str | None:
    """Why these bytes may not be served (None: they may): only the kept base, or an artifact whose
    latest sign-off decision in the trail approved exactly this content hash, is served.

    An alias is a pointer anyone with MLflow access can move; the trail is the record of sign-off,
    so the alias target is checked against it every time it is resolved."""
    if ref["kind"] == "base":
        return None
    decided = [e for e in decisions(store, model_name, ref["artifact_id"]) if e["event"] != "pending sign-off"]
    if not decided or decided[-1]["event"] != "approved":
        state = decided[-1]["event"] if decided else "never approved"
        return f"{ref['artifact_id']} is not approved ({state} in the trail of {model_name})"
    if decided[-1].get("content_hash") != ref["content_hash"]:
        return f"{ref['artifact_id']}: the approved content hash differs from the bytes the registry names"
    return None


def _record_disagrees(record_path: Path, ref: dict) -> list[str]:
    """The bundled record (which `show` and the audit report read) must say what the registry's reference says of
    the same bytes: it is not among the hashed files, so its provenance fields are checked one by one."""
    if not record_path.is_file():
        return []
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except ValueError:
        return [f"{RECORD_FILE}: not valid JSON"]
    return [
        f"{RECORD_FILE}: its {key} differs from the registered one"
        for key in ("files", "content_hash", "base_hash", "recipe", "calibration_hash", "runtime_hash")
        if record.get(key) is not None and record[key] != ref.get(key)
    ]


def fetch_bundled(ref: dict) -> Path:
    """Download a bundled version's files from the tracking server into the local store (the cache), keeping them
    only if every file hashes as the reference says and the reference adds up to the registry's content hash:
    what it returns is verified, and needs no second hashing before use."""
    check_consistent(ref)
    final = Path(ref["model_dir"])
    with atomic_directory(final) as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=ref["fetch_from"], dst_path=str(tmp / "download"), tracking_uri=ref["tracking_uri"]
            )
        except Exception as e:  # noqa: BLE001 - any transport failure is one refusal, the cache left as it was
            raise ServingError(f"cannot fetch {ref['artifact_id']} from {ref['fetch_from']}: {e}") from None
        problems = verify_tree(Path(local), ref["files"]) + _record_disagrees(Path(local) / RECORD_FILE, ref)
        if problems:
            raise ServingError(
                f"refusing {ref['artifact_id']} fetched from {ref['fetch_from']}: its files differ from the registered "
                f"hashes ({'; '.join(problems[:3])}); nothing was kept"
            )
        for item in Path(local).iterdir():
            os.replace(item, tmp / item.name)
        shutil.rmtree(tmp / "download", ignore_errors=True)
    return final


def ensure_verified(ref: dict) -> bool:
    """The version's files here, each verified against the reference: a bundled version this store lacks is
    fetched (and verified as it is kept), anything else re-hashed where it lies. True when it was fetched."""
    if ref.get("fetch_from") and not Path(ref["model_dir"]).is_dir():
        fetch_bundled(ref)
        return True
    verify_ref(ref)
    return False


def load_verified(ref: dict):
    """Verify every file against the reference (fetching a bundled version first where this store lacks it), then
    load (safetensors only) on the placement `QP_DEVICE` names, the one setting the audits ran under (a model
    served on another device computes other numbers)."""
    ensure_verified(ref)
    return load_model(Path(ref["model_dir"]), where=placement(os.environ.get("QP_DEVICE", "auto")))
