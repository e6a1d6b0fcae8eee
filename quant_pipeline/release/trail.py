"""Append-only, tamper-evident audit trail (JSON Lines, one hash-chained entry per line).

Approval history is evidence: an auditor must be able to tell whether anyone edited, removed or
reordered a decision after it was recorded. A plain JSONL file cannot show that, so each entry
carries its position (`seq`), the hash of the entry before it (`prev_hash`) and its own `hash`
(sha256 of its canonical JSON without `hash`). Editing an entry changes its hash; removing or
reordering one breaks the link from the next entry. What a file alone cannot show is that its
*last* entries were cut off, or that the whole file was swapped for a shorter valid chain (both
are still consistent), so the head hash and entry count are also kept somewhere else (the model's
MLflow tags, see `release.signoff.record_event`) and passed to `verify_trail` as an anchor.

Appends go through the store's locked append (`core.store.append_line_locked`): the lock spans
reading the last entry and writing the new one, so concurrent appenders never fork the chain, and
each line is fsynced before the lock is released, so an acknowledged entry survives a crash.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from quant_pipeline.core.records import SCHEMA_VERSION, TrailEntry, first_error
from quant_pipeline.core.store import StoreError, append_line_locked, last_line, locked_for_reading, read_json_lines

GENESIS_HASH = "0" * 64
RESERVED = ("seq", "prev_hash", "hash")


def _canonical(obj: object) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def entry_hash(entry: dict) -> str:
    """sha256 of the entry's canonical JSON, `hash` itself left out (it cannot cover itself)."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(_canonical(body).encode("utf-8")).hexdigest()


def append_entry(path: Path, event: dict, before_write: Callable[[dict | None, dict], None] | None = None) -> dict:
    """Append ``event`` as the next chained entry and return the entry exactly as stored.

    Adds `seq` (0-based), `at` (UTC ISO-8601 unless the event has one), `prev_hash` and `hash`.
    The event must not carry `seq`, `prev_hash` or `hash`: those are the chain's, not the caller's.
    Refuses to append to a trail whose last line is torn or not JSON (a crash mid-write or an
    edit): chaining onto a damaged head would hide the damage, so a person must look first.

    ``before_write(previous, entry)`` runs under the append lock, after the entry is built and
    before its line is written (`previous` is the entry before it, None for the first): the place
    to check and move an anchor, so two appenders cannot publish their heads out of order. If it
    raises, nothing is written.
    """
    clash = [k for k in RESERVED if k in event]
    if clash:
        raise ValueError(f"event must not set {', '.join(clash)}: the trail assigns them")

    def chained(last: bytes | None) -> str:
        if last is None:
            seq, prev = 0, GENESIS_HASH
        else:
            try:
                previous = json.loads(last)
                seq, prev = int(previous["seq"]) + 1, str(previous["hash"])
            except (ValueError, KeyError, TypeError) as e:
                raise StoreError(
                    f"{path}: last entry is not a valid trail entry ({e}); run verify-trail first"
                ) from None
        entry = {**event, "seq": seq, "prev_hash": prev}
        entry.setdefault("at", dt.datetime.now(dt.UTC).isoformat())
        entry.setdefault("schema_version", SCHEMA_VERSION)
        # Store what JSON can represent (Path -> str, tuples -> lists) so that the hash computed
        # now is the hash an auditor recomputes from the line later.
        entry = json.loads(json.dumps(entry, default=str))
        entry["hash"] = entry_hash(entry)
        if before_write is not None:
            before_write(None if last is None else previous, entry)
        stored.append(entry)
        return _canonical(entry)

    stored: list[dict] = []
    append_line_locked(Path(path), chained)
    return stored[0]


def read_entries(path: Path) -> list[dict]:
    """All entries in file order ([] when the trail does not exist yet).

    Each entry is validated as a `TrailEntry`; a line that is not one raises a one-line StoreError
    naming the line (use `verify_trail` to audit a trail, `read_verified` to act on what it holds).
    """
    entries = []
    for number, obj in read_json_lines(path):
        if problem := _not_an_entry(number, obj):  # kept exactly as stored (its hash covers it), once validated
            raise StoreError(f"{path} {problem}; run verify-trail")
        entries.append(obj)
    return entries


def head_hash(path: Path) -> str | None:
    """Hash of the last entry: the value to keep elsewhere as the anchor for `verify_trail`."""
    path = Path(path)
    if not path.exists():
        return None
    with locked_for_reading(path) as f:
        last = last_line(f)
    if last is None:
        return None
    try:
        return json.loads(last).get("hash")
    except (ValueError, AttributeError):
        return None


def verify_trail(path: Path, expected_head: str | None = None, expected_length: int | None = None) -> list[str]:
    """Everything wrong with the trail, in file order; an empty list means it is intact (see `verify_bytes`)."""
    return read_verified(path, expected_head, expected_length)[1]


def read_verified(
    path: Path, expected_head: str | None = None, expected_length: int | None = None
) -> tuple[list[dict], list[str]]:
    """The trail's entries and everything wrong with it, both from one read of the file.

    Whoever acts on the trail (approves, promotes, carries an approval over, skips a re-audit) must act on
    the bytes that were verified: a check and a read made apart leave a window in which the file can be
    swapped, verified intact and then read doctored, and put back before anyone looks again."""
    path = Path(path)
    data = b""
    if path.exists():
        with locked_for_reading(path) as f:  # never a line an appender is half-way through
            data = f.read()
    return verify_bytes(data, expected_head, expected_length)


def verify_bytes(
    data: bytes, expected_head: str | None = None, expected_length: int | None = None
) -> tuple[list[dict], list[str]]:
    """A trail's entries and everything wrong with them (each must also validate as a `TrailEntry`).

    Reports lines that are not JSON entries, entries whose content no longer matches their hash
    (edited), entries whose `prev_hash` does not match the entry before them (one was removed or
    reordered), gaps in `seq`, and a torn last line (no final newline: every append ends its line,
    so only a crash mid-write or an edit leaves one, and appends are refused until it is repaired).
    The bytes cannot show that entries were cut off their end or that the file was swapped for a shorter
    valid chain; pass the head hash and entry count recorded elsewhere as ``expected_head`` and
    ``expected_length`` to catch that too. The entries of a broken trail are those lines that are JSON
    objects, unvalidated: something to show a person, never to act on.
    """
    problems: list[str] = []
    entries: list[dict] = []
    text = data.decode("utf-8", errors="replace")
    lines = text.removesuffix("\n").split("\n") if text else []
    prev_hash: str | None = GENESIS_HASH  # None: the line before was unreadable, skip the link check
    expected_seq: int | None = 0
    head: str | None = None
    for number, line in enumerate(lines, start=1):
        try:
            entry = json.loads(line)
        except ValueError:
            entry = None
        if not isinstance(entry, dict):
            problems.append(f"line {number}: not a JSON trail entry")
            prev_hash, expected_seq, head = None, None, None
            continue
        entries.append(entry)
        seq = entry.get("seq")
        label = f"entry {seq}" if isinstance(seq, int) else f"entry at line {number}"
        stored = entry.get("hash")
        if not isinstance(stored, str):
            problems.append(f"{label} (line {number}): has no hash")
        elif entry_hash(entry) != stored:
            problems.append(f"{label} (line {number}): content was edited")
        if prev_hash is not None and entry.get("prev_hash") != prev_hash:
            problems.append(f"{label}: chain broken — an entry before it was removed or reordered")
        if not isinstance(seq, int):
            problems.append(f"{label}: has no integer seq")
        elif expected_seq is not None and seq != expected_seq:
            problems.append(f"{label}: seq gap — expected {expected_seq}")
        prev_hash = stored if isinstance(stored, str) else None
        expected_seq = seq + 1 if isinstance(seq, int) else None
        head = stored if isinstance(stored, str) else None
    if data and not data.endswith(b"\n"):
        problems.append(
            f"line {len(lines)}: torn — the file does not end in a newline (a crash mid-write, or an edit); "
            "appends are refused until a person repairs it"
        )
    problems += anchor_problems(head, expected_head)
    if expected_length is not None and len(lines) != expected_length:
        problems.append(
            f"the anchor records {expected_length} entries but the trail has {len(lines)}: "
            "entries were removed or added outside the pipeline, or the trail was replaced"
        )
    if not problems:  # a chain intact line by line, each line must also be an entry the pipeline writes
        problems = [p for number, e in enumerate(entries, start=1) if (p := _not_an_entry(number, e))]
    return entries, problems


def _not_an_entry(number: int, obj: dict) -> str:
    try:
        TrailEntry.model_validate(obj)
    except ValidationError as e:
        return f"line {number}: not a trail entry (field `{first_error(e)[0]}`)"
    return ""


def anchor_problems(head: str | None, expected_head: str | None) -> list[str]:
    """The trail's head against an anchor kept elsewhere (none to check: no problem)."""
    if expected_head is None or head == expected_head:
        return []
    return [
        f"head hash differs from the anchor (anchor {expected_head[:16]}…, "
        f"trail {head[:16] + '…' if head else 'empty'}): "
        "entries were removed from the end, or the trail was replaced"
    ]
