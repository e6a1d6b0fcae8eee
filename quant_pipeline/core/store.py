"""The artifact store: the one owner of the store's layout, of atomic writes and of verification.

Every path into the store is built here, from names checked against a strict pattern first, so
no model name or artifact ID from a command line, a YAML file or an MLflow tag can reach outside
its folder (`delete-base ../trail` once deleted the audit trail). Every write is atomic: a unique
temp name beside the target (pid + random suffix, so two runs never share one), fsync, rename.
A run killed mid-write leaves only such temp names behind; `sweep_stale` removes those whose
process is gone, at the start of the next run.

Only a local-disk store exists today. `StoreBackend` names what the pipeline needs of a store, so
a shared backend (MLflow's artifact store, an object store) can implement the same operations
with the local folder as its cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import RECORD_FILE, diff_hashes, file_hashes

# A model name or artifact ID: letters, digits, '.', '_', '-'; starts with a letter or digit; no '..'.
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TMP_PREFIX = ".tmp-"


class StoreError(AuditInputError):
    """A name the store refuses, or store content that fails verification."""


def check_name(name: object, what: str = "name") -> str:
    """`name` unchanged if it is safe as one path component and inside an MLflow filter string."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise StoreError(
            f"{what} {name!r} is not allowed: use letters, digits, '.', '_' and '-' only "
            "(starting with a letter or digit, no '..', at most 128 characters)"
        )
    return name


def _tmp_name(final: Path) -> Path:
    return final.parent / f"{TMP_PREFIX}{final.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a unique temp path beside ``final``; fsync and rename it into place if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: object) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside ``final``; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        if final.exists():
            old = _tmp_name(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def append_line_locked(path: Path, build: Callable[[bytes | None], str], repair_torn: bool = False) -> str:
    """Append one line under an exclusive flock; ``build(last_line)`` makes it from the current last line.

    The lock spans reading the last line and writing the new one, so concurrent appenders (threads
    or processes) never interleave or fork a chain; the line is fsynced before the lock is released.
    A torn last line (a crash mid-write) is refused, or with ``repair_torn`` closed by a newline so
    the new line stands alone."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    created = not path.exists()
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            size = f.seek(0, os.SEEK_END)
            prefix = b""
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    if not repair_torn:
                        raise StoreError(
                            f"{path}: last line is incomplete (torn write or edit); verify it before appending"
                        )
                    prefix = b"\n"
            line = build(None if prefix else last_line(f))
            f.write(prefix + line.encode("utf-8") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    if created:
        _fsync_dir(path.parent)
    return line


@contextlib.contextmanager
def locked_for_reading(path: Path) -> Iterator[BinaryIO]:
    """The file open under a shared flock for as long as the block runs: no appender can add a line meanwhile
    (what copying a log elsewhere needs, so that the copy is never older than what a later copy replaces)."""
    with open(path, "rb") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_SH)
        try:
            yield f
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def extend_locked(path: Path, data: bytes) -> int:
    """Make the log ``data``, under an exclusive flock, by appending what it lacks; the bytes added (0 when it
    holds all of it). Refused when the log is not a prefix of ``data``: two copies that disagree are a fork for
    a person to look at, never something to overwrite."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            f.seek(0)
            current = f.read()
            if not data.startswith(current):
                if current.startswith(data):
                    return 0
                raise StoreError(f"{path}: this copy and the shared one disagree (a fork): neither was changed")
            f.write(data[len(current) :])
            f.flush()
            os.fsync(f.fileno())
            return len(data) - len(current)
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def last_line(f, chunk: int = 1 << 16) -> bytes | None:
    """The last non-empty line of a binary file, read from the end (logs may be long)."""
    end = f.seek(0, os.SEEK_END)
    pos, tail = end, b""
    while pos > 0:
        step = min(chunk, pos)
        pos -= step
        f.seek(pos)
        tail = f.read(step) + tail
        stripped = tail.rstrip(b"\n")
        if b"\n" in stripped:
            return stripped.rsplit(b"\n", 1)[1]
    stripped = tail.rstrip(b"\n")
    return stripped or None


def read_lines_locked(path: Path) -> list[str]:
    """Every line of a log under a shared flock (never a line an appender is half-way through)."""
    with locked_for_reading(path) as f:
        data = f.read()
    text = data.decode("utf-8", errors="replace")
    return text.removesuffix("\n").split("\n") if text else []


def verify_tree(directory: Path, files: dict[str, str]) -> list[str]:
    """What differs between ``directory`` now and a recorded {path: sha256} map ([] = intact).

    The one verification every reader uses before trusting bytes: artifacts, kept baselines,
    registered references."""
    if not Path(directory).is_dir():
        return [f"{directory}: missing"]
    return diff_hashes(files, file_hashes(directory))


def read_json_lines(path: Path, skip_torn: bool = False) -> list[tuple[int, object]]:
    """(line number, parsed JSON) for every non-empty line of a log, read under a shared lock.

    A line that is not JSON is refused naming its number, or skipped with ``skip_torn`` (a log
    whose readers must go on past a line cut by a crash)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for number, line in enumerate(read_lines_locked(path), start=1):
        if not line.strip():
            continue
        try:
            out.append((number, json.loads(line)))
        except ValueError as e:
            if not skip_torn:
                raise StoreError(f"{path} line {number}: not valid JSON ({e}); run verify-trail") from None
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine (a permission error means it does)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StoreBackend(Protocol):
    """What the pipeline needs of a store; a shared backend implements these over a local cache."""

    root: Path

    def artifact_dir(self, artifact_id: str) -> Path: ...
    def checkpoint_dir(self, model_name: str) -> Path: ...
    def eval_dir(self, key: str) -> Path: ...
    def report_dir(self, name: str) -> Path: ...
    def delta_report_dir(self, artifact_id: str, key: str) -> Path: ...
    def policy_path(self, policy_hash: str) -> Path: ...
    def trail_path(self, model_name: str) -> Path: ...
    def requests_path(self, model_name: str) -> Path: ...
    def sweep_stale(self) -> list[Path]: ...


class ArtifactStore:
    """The local-disk store under ``root``: checkpoints/, artifacts/, evals/, reports/, trail/, requests/."""

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()

    @classmethod
    def of(cls, store: ArtifactStore | Path | str) -> ArtifactStore:
        return store if isinstance(store, ArtifactStore) else cls(store)

    def __fspath__(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"ArtifactStore({str(self.root)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArtifactStore) and other.root == self.root

    def __hash__(self) -> int:
        return hash(self.root)

    # -- layout: the only place store paths are built ------------------------------------------
    def checkpoint_dir(self, model_name: str) -> Path:
        return self.root / "checkpoints" / check_name(model_name, "model name")

    def artifact_dir(self, artifact_id: str) -> Path:
        return self.root / "artifacts" / check_name(artifact_id, "artifact ID")

    def artifact_record_path(self, artifact_id: str) -> Path:
        return self.artifact_dir(artifact_id) / RECORD_FILE

    def artifact_ids(self) -> list[str]:
        folder = self.root / "artifacts"
        return sorted(p.parent.name for p in folder.glob(f"*/{RECORD_FILE}")) if folder.is_dir() else []

    def eval_dir(self, key: str) -> Path:
        return self.root / "evals" / check_name(key, "eval key")

    def report_dir(self, name: str) -> Path:
        """Reports of one artifact (its ML-BOM, its delta reports) or one model (audit report)."""
        return self.root / "reports" / check_name(name, "report name")

    def delta_report_dir(self, artifact_id: str, key: str) -> Path:
        """One verdict: an artifact judged under one policy on one evaluation (the key names both), so a
        re-judgement under another policy is a new report beside the old one, never a rewrite of it."""
        return self.report_dir(artifact_id) / "delta" / check_name(key, "delta report key")

    def policy_path(self, policy_hash: str) -> Path:
        """A copy of a policy a model was governed by, named by its sha256 (verified when read back)."""
        return self.root / "policies" / f"{check_name(policy_hash, 'policy hash')}.yaml"

    def trail_path(self, model_name: str) -> Path:
        return self.root / "trail" / f"{check_name(model_name, 'model name')}.jsonl"

    def requests_path(self, model_name: str) -> Path:
        return self.root / "requests" / f"{check_name(model_name, 'model name')}.jsonl"

    def contains(self, path: Path) -> bool:
        return self.root in Path(path).resolve().parents

    # -- crash recovery --------------------------------------------------------------------------
    def sweep_stale(self) -> list[Path]:
        """Remove temp files and folders left by processes that no longer run; return what was removed."""
        removed = []
        if not self.root.is_dir():
            return removed
        for tmp in self.root.rglob(f"{TMP_PREFIX}*"):
            parts = tmp.name.rsplit("-", 2)
            pid = int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None
            if pid is not None and pid_alive(pid):
                continue
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            removed.append(tmp)
        return removed
