"""Reading an artifact's record and re-verifying its bytes: the one path every consumer takes."""

from __future__ import annotations

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import RECORD_FILE
from quant_pipeline.core.records import ArtifactRecord, RecordError
from quant_pipeline.core.store import ArtifactStore, verify_tree


class ArtifactNotFound(AuditInputError):
    """No artifact of that ID in the store."""


def read_artifact_record(store: ArtifactStore, artifact_id: str) -> ArtifactRecord:
    """The artifact's record, validated (its files add up to its content hash)."""
    path = store.artifact_record_path(artifact_id)
    if not path.exists():
        raise ArtifactNotFound(
            f"no artifact {artifact_id} in {store.root / 'artifacts'}: "
            "check the ID (`quant-pipeline show` lists records)"
        )
    try:
        return ArtifactRecord.read(path)
    except RecordError as e:
        raise AuditInputError(f"artifact {artifact_id}: {e}") from None


def _rehash(store: ArtifactStore, artifact_id: str) -> tuple[ArtifactRecord, list[str]]:
    record = read_artifact_record(store, artifact_id)
    return record, verify_tree(store.artifact_dir(artifact_id), record.files)


def artifact_problems(store: ArtifactStore, artifact_id: str) -> list[str]:
    """Each of the artifact's files that no longer matches its record ([] when all match)."""
    return _rehash(store, artifact_id)[1]


def verify_artifact(store: ArtifactStore, artifact_id: str) -> ArtifactRecord:
    """Re-hash the artifact's files against its record; raise naming each file that differs.

    This proves the bytes are the ones recorded when the artifact was built; it cannot prove
    that nobody rewrote both files and record, which is what the registry's hash is for."""
    directory = store.artifact_dir(artifact_id)
    if not (directory / RECORD_FILE).exists():
        raise AuditInputError(f"{directory} has no {RECORD_FILE}: not a complete quant_pipeline artifact")
    record, problems = _rehash(store, artifact_id)
    if problems:
        raise AuditInputError(f"artifact {artifact_id} failed hash verification: {'; '.join(problems)}")
    return record
