"""Atomic directory writes and content hashing (the store's primitives)."""

import pytest

from quant_pipeline.core.hashing import diff_hashes, file_hashes, hash_directory
from quant_pipeline.core.store import atomic_directory


def test_atomic_directory_leaves_nothing_when_the_block_fails(tmp_path):
    target = tmp_path / "artifacts" / "a1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.safetensors").write_bytes(b"partial")
            raise RuntimeError("quantization crashed")
    assert not target.exists()
    assert list((tmp_path / "artifacts").iterdir()) == []


def test_atomic_directory_appears_complete_or_not_at_all(tmp_path):
    target = tmp_path / "a2"
    with atomic_directory(target) as tmp:
        (tmp / "model.safetensors").write_bytes(b"x" * 10)
        assert not target.exists()
    assert (target / "model.safetensors").read_bytes() == b"x" * 10


def test_directory_hash_changes_with_content_and_names_the_file(tmp_path):
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    before_files, before = file_hashes(tmp_path), hash_directory(tmp_path)
    (tmp_path / "b.txt").write_text("TWO")
    assert hash_directory(tmp_path) != before
    assert diff_hashes(before_files, file_hashes(tmp_path)) == ["b.txt: content changed"]
