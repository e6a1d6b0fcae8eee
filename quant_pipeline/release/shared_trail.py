"""The audit trail when several hosts write it: one shared copy on the tracking server, one writer at a time.

On one machine the trail is a file in the store, its appends serialized by a flock and anchored in MLflow
(`release.signoff.record_event`). Hosts that share an MLflow tracking server do not share a store, so:

- **The shared copy** is an artifact of the model's `audit trail` run on the server (`trail/<model>.jsonl`),
  uploaded after every append while the local file is read-locked (no later append can be overtaken by an
  older copy). A host whose local trail is behind the anchor first takes the missing entries from it: only
  if the shared copy verifies against the anchor and extends the local file (anything else is a fork, refused).
- **One writer at a time across hosts**: with `QP_TRAIL_LOCK_URL` (a PostgreSQL database, e.g. Dagster's) the
  whole append (catch up, chain, move the anchor, upload) runs under a PostgreSQL advisory lock per model, so
  two hosts never chain onto the same head. Without it, the anchor check still refuses the second of two
  racing appends (fail closed: "does not end at its anchor"), which a retry then appends after catching up.

A crash between moving the anchor and uploading leaves the shared copy one entry behind: a host that has never
seen the trail then refuses to trust it until the next append uploads the whole file again.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.store import StoreError, extend_locked, locked_for_reading
from quant_pipeline.release.trail import head_hash, verify_bytes

if TYPE_CHECKING:  # MLflow takes seconds to import: the read-only verbs that import sign-off run without it
    from quant_pipeline.core.tracking import MlflowTracker

TRAIL_HEAD_TAG, TRAIL_LENGTH_TAG = "trail_head", "trail_length"  # the anchor, on the registered model
LOCK_URL_ENV = "QP_TRAIL_LOCK_URL"
TRAIL_RUN = "audit trail"  # the run (stage tag and name) holding the model's shared trail
TRAIL_DIR = "trail"
POLICY_DIR = "policies"  # beside it: each policy the model was pinned to, named by its sha256


class SharedTrailError(AuditInputError):
    """The shared trail cannot be trusted or reached (the message says which and why)."""


@contextlib.contextmanager
def writer_lock(model_name: str) -> Iterator[None]:
    """Hold the model's PostgreSQL advisory lock for the block when QP_TRAIL_LOCK_URL names a database."""
    url = os.environ.get(LOCK_URL_ENV, "").replace("postgresql+psycopg2://", "postgresql://")
    if not url:
        yield
        return
    import psycopg2  # only where a lock database is configured

    key = int.from_bytes(hashlib.sha256(f"quant_pipeline/trail/{model_name}".encode()).digest()[:8], "big", signed=True)
    try:
        conn = psycopg2.connect(url, connect_timeout=10)
    except psycopg2.Error as e:
        raise SharedTrailError(f"{LOCK_URL_ENV}: cannot reach the trail lock database ({str(e).strip()})") from None
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (key,))
        yield
    finally:
        conn.close()  # ends the session, which releases its advisory locks


def _trail_run(tracker: MlflowTracker, model_name: str, create: bool) -> str | None:
    client, exp_id = tracker.client(), tracker.experiment_id(model_name)
    found = client.search_runs([exp_id], filter_string=f"tags.stage = '{TRAIL_RUN}'", max_results=1)
    if found:
        return found[0].info.run_id
    if not create:
        return None
    return client.create_run(exp_id, run_name=TRAIL_RUN, tags={"stage": TRAIL_RUN}).info.run_id


def push(tracker: MlflowTracker, model_name: str, path: Path) -> None:
    """Upload the local trail as the shared copy, holding it read-locked so no append slips in meanwhile."""
    run_id = _trail_run(tracker, model_name, create=True)
    with locked_for_reading(path) as f, tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / path.name
        copy.write_bytes(f.read())
        tracker.client().log_artifact(run_id, str(copy), TRAIL_DIR)


def share_policy(tracker: MlflowTracker, model_name: str, copy: Path) -> None:
    """Put a pinned policy (the store's copy, named by its sha256) beside the shared trail, where a host that
    rebuilds its store finds it (`release.rebuild`); off a server there is no one to share it with."""
    if getattr(tracker, "is_server", False):
        tracker.client().log_artifact(_trail_run(tracker, model_name, create=True), str(copy), POLICY_DIR)


def catch_up(tracker: MlflowTracker, model_name: str, path: Path) -> int:
    """Bring the local trail up to its MLflow anchor from the shared copy; the bytes added (0 off a server).

    Nothing to do when there is no anchor or the local head is the anchored one. The shared copy must verify
    against the anchor and extend the local file; anything else is refused, the local file left as it was."""
    if not getattr(tracker, "is_server", False):
        return 0
    anchor = tracker.model_tags(model_name) or {}
    head, length = anchor.get(TRAIL_HEAD_TAG), anchor.get(TRAIL_LENGTH_TAG)
    if head is None or head_hash(path) == head:
        return 0
    run_id = _trail_run(tracker, model_name, create=False)
    if run_id is None:
        return 0  # nothing shared: the anchor check that follows says what is wrong
    with tempfile.TemporaryDirectory() as tmp:
        try:
            local = tracker.client().download_artifacts(run_id, f"{TRAIL_DIR}/{path.name}", tmp)
        except Exception:  # noqa: BLE001 - no shared copy is the same finding as an unreachable one
            return 0
        data = Path(local).read_bytes()  # verified as read, and extended with these bytes, not a second read
        _, problems = verify_bytes(data, expected_head=head, expected_length=int(length) if length else None)
        if problems:
            raise SharedTrailError(
                f"the shared trail of {model_name} on {tracker.uri} does not verify against its anchor "
                f"({problems[0]}): nothing was taken from it"
            )
    try:
        return extend_locked(path, data)
    except StoreError as e:
        raise SharedTrailError(f"trail of {model_name}: {e}") from None
