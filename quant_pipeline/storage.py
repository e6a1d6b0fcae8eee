"""Content hashing and atomic directory writes.

An auditor's question is "which exact bytes"; so every artifact is identified by a hash over its
files, written into a temp dir and renamed into place (a crash never leaves a half-written artifact
under a real name), and re-hashed before it is used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

RECORD_FILE = "quant_pipeline_record.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_hashes(directory: Path, exclude: tuple[str, ...] = (RECORD_FILE,)) -> dict[str, str]:
    """sha256 of every file below ``directory`` (relative posix path -> hex), sorted."""
    out = {}
    for p in sorted(directory.rglob("*")):
        if p.is_file() and p.name not in exclude and "__pycache__" not in p.parts:
            out[p.relative_to(directory).as_posix()] = sha256_file(p)
    return out


def tree_hash(files: dict[str, str]) -> str:
    """One hash over a {relative path: file hash} map, independent of where the tree lies."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def hash_directory(directory: Path) -> str:
    return tree_hash(file_hashes(directory))


def canonical_hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def dir_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def diff_hashes(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Human-readable list of what differs between two {path: hash} maps."""
    problems = []
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            problems.append(f"{name}: missing")
        elif name not in recorded:
            problems.append(f"{name}: unexpected file")
        elif recorded[name] != actual[name]:
            problems.append(f"{name}: content changed")
    return problems


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; rename it to ``final`` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        os.replace(tmp, final) if not final.exists() else _replace_dir(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
    os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)
