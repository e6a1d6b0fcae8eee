"""A reference is checked against the registry's content hash before any file is trusted by it."""

from pathlib import Path

import pytest

from quant_pipeline.release.reference import ServingError, build_ref, verify_ref
from quant_pipeline.serving.resolver import fetch_bundled


def _ref(tmp_path: Path) -> dict:
    model = tmp_path / "store" / "artifacts" / "gptq-w4g64-000000000000"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    (model / "config.json").write_text("{}")
    return build_ref(model, {"artifact_id": "gptq-w4g64-000000000000", "recipe": {"method": "gptq"}})


def test_a_reference_whose_file_hashes_do_not_add_up_to_its_content_hash_is_refused(tmp_path):
    ref = _ref(tmp_path)
    verify_ref(ref)  # the folder as referenced: accepted
    # the folder and the list agree with each other, but not with the content hash the registry signed
    (Path(ref["model_dir"]) / "model.safetensors").write_bytes(b"other weights")
    forged = dict(ref, files=dict(ref["files"], **{"model.safetensors": "0" * 64}))
    with pytest.raises(ServingError, match="inconsistent"):
        verify_ref(forged)


def test_a_bundled_version_with_an_inconsistent_reference_is_refused_before_anything_is_downloaded(tmp_path):
    ref = _ref(tmp_path)
    target = tmp_path / "host" / "artifacts" / ref["artifact_id"]
    forged = dict(
        ref, model_dir=str(target), files=dict(ref["files"], **{"model.safetensors": "0" * 64}),
        fetch_from="runs:/0123456789abcdef/model/artifacts/weights", tracking_uri="http://127.0.0.1:9",
    )  # fmt: skip
    with pytest.raises(ServingError, match="inconsistent"):
        fetch_bundled(forged)
    assert not target.exists()
