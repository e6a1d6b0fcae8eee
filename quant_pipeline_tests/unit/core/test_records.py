"""Typed records: validated when read, the field at fault named, unknown schema versions refused."""

import json

import pytest

from quant_pipeline.core.hashing import tree_hash
from quant_pipeline.core.records import ArtifactRecord, CheckpointRecord, DeltaReportRecord, RecordError, TrailEntry

FILES = {"model.safetensors": "a" * 64, "config.json": "b" * 64}


def artifact(**changes) -> dict:
    record = {
        "artifact_id": "gptq-w4g64-0123456789ab", "model_name": "m", "base_hash": "c" * 64, "base_path": "/b",
        "recipe": {"method": "gptq", "bits": 4}, "calibration_hash": "d" * 64, "calibration_count": 8,
        "runtime_hash": "e" * 64, "runtime": {}, "precision": "int4", "scales": {"hash": "f" * 64, "layers": 2},
        "files": FILES, "content_hash": tree_hash(FILES), "size_bytes": 10,
    }  # fmt: skip
    return {**record, **changes}


def test_an_artifact_record_round_trips_through_disk(tmp_path):
    record = ArtifactRecord.parse(artifact())
    path = record.write(tmp_path / "r.json")
    assert ArtifactRecord.read(path) == record and json.loads(path.read_text())["schema_version"] == 1


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"content_hash": "0" * 64}, "per-file hashes do not add up"),
        ({"size_bytes": "big"}, "size_bytes"),
        ({"schema_version": 99}, "schema_version 99"),
        ({"approved": True}, "approved"),
    ],
)
def test_an_edited_artifact_record_is_refused_naming_the_field(tmp_path, change, field):
    path = tmp_path / "record.json"
    path.write_text(json.dumps(artifact(**change)))
    with pytest.raises(RecordError) as refused:
        ArtifactRecord.read(path)
    assert str(path) in str(refused.value) and field in str(refused.value) and "\n" not in str(refused.value)


def test_a_missing_field_and_broken_json_are_one_line_errors(tmp_path):
    record = artifact()
    del record["files"]
    (tmp_path / "a.json").write_text(json.dumps(record))
    with pytest.raises(RecordError, match="field `files`"):
        ArtifactRecord.read(tmp_path / "a.json")
    (tmp_path / "b.json").write_text('{"artifact_id": ')
    with pytest.raises(RecordError, match="not valid JSON"):
        DeltaReportRecord.read(tmp_path / "b.json")


def test_a_checkpoint_record_must_add_up():
    with pytest.raises(RecordError, match="do not add up"):
        CheckpointRecord.parse({"source": {}, "files": FILES, "hash": "0" * 64})


def test_trail_entries_keep_their_event_fields():
    entry = TrailEntry.model_validate(
        {"event": "approved", "seq": 0, "prev_hash": "0", "hash": "h", "at": "t", "by": "Ada"}
    )
    assert entry.model_extra == {"by": "Ada"}
