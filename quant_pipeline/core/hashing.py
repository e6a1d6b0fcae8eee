"""The one way to hash: files, directory trees and canonical JSON.

An auditor's question is "which exact bytes"; so every artifact is identified by a hash over its
files (a tree hash independent of where the tree lies), and re-hashed before it is used.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RECORD_FILE = "quant_pipeline_record.json"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_text(text: str) -> str:
    return sha256_bytes(text.encode("utf-8"))


def file_matches(path: Path, digest: str) -> bool:
    """Whether a file is there and hashes to ``digest`` (a copy named by its hash, a file a record vouches for)."""
    return Path(path).is_file() and sha256_file(path) == digest


def file_hashes(directory: Path, exclude: tuple[str, ...] = (RECORD_FILE,)) -> dict[str, str]:
    """sha256 of every file below ``directory`` (relative posix path -> hex), sorted."""
    out = {}
    for p in sorted(Path(directory).rglob("*")):
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
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


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
