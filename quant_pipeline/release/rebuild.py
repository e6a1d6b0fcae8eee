"""A model's records rebuilt from the tracking server into a store, each file kept only if the trail vouches for it.

With a tracking server the local store is a cache: any host can rebuild it (`quant-pipeline pull`). Trust comes
from the audit trail, nothing else: it is caught up from the server's shared copy and verified against its anchor
on the registered model (outside every store); then a file is taken from the server only if its sha256 is one the
trail recorded:

- a verdict's delta report: the `report_sha256` of its `evaluated` entry (and every file of the report in
  `report_files`, for entries written since that field exists; older entries vouch for the JSON only);
- the eval tables the verdict was computed from: the entry's `eval_tables`;
- every policy the model was judged or pinned under: the file is named by its `policy_hash`.

MLflow's runs and tags only say where to look, and anyone with access to the server can change them: a file found
there that hashes otherwise is refused, and nothing of it is kept. The audit report is written afresh from what
was taken (a document derived from verified inputs needs no trust of its own). The weights of each registered
version come through the serving resolver (`cli/pull.py`), checked against the registry's content hash.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import file_matches, sha256_bytes
from quant_pipeline.core.store import ArtifactStore, atomic_directory, write_bytes_atomic
from quant_pipeline.release import shared_trail
from quant_pipeline.release.evidence import EVAL_TABLES
from quant_pipeline.release.signoff import verified_model_trail

if TYPE_CHECKING:
    from quant_pipeline.core.tracking import MlflowTracker

REPORT_JSON = "delta_report.json"
EVAL_STAGES = {"base": "base_eval_results", "quantized": "quantized_eval_results"}


class RebuildError(AuditInputError):
    """The model's records cannot be rebuilt from the server at all (no trail, or one that does not verify)."""


KINDS = ("fetched", "present", "written", "refused", "missing")


@dataclass
class Pulled:
    """What a rebuild did with each thing, in order: taken from the server (fetched), already here and verified
    (present), derived here from those (written), found but not the bytes the trail names (refused), or not on
    the server at all (missing: logged before it kept a copy)."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def add(self, kind: str, what: str) -> None:
        assert kind in KINDS, kind
        self.lines.append((kind, what))

    def count(self, kind: str) -> int:
        return sum(k == kind for k, _ in self.lines)

    @property
    def ok(self) -> bool:
        return not self.count("refused") and not self.count("missing")


class ServerFiles:
    """The model's runs on the server, listed once, and the files they hold, fetched by the hash they must have."""

    def __init__(self, tracker: MlflowTracker, model_name: str):
        self.client = tracker.client()
        exp_id, self.runs, token = tracker.experiment_id(model_name), [], None
        while True:
            page = self.client.search_runs([exp_id], max_results=1000, order_by=["start_time DESC"], page_token=token)
            self.runs += list(page)
            token = page.token
            if not token:
                break

    def _runs(self, stages: tuple[str, ...], tags: dict) -> list:
        return [
            r
            for r in self.runs
            if r.data.tags.get("stage") in stages and all(r.data.tags.get(k) == v for k, v in tags.items())
        ]

    def _read(self, run_id: str, artifact_path: str) -> bytes | None:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = Path(self.client.download_artifacts(run_id, artifact_path, tmp))
            except Exception:  # noqa: BLE001 - absent or unreachable: either way not a copy to take
                return None
            return local.read_bytes() if local.is_file() else None

    def find(self, stages: tuple[str, ...], names: list[str], digest: str, tags: dict | None = None) -> bytes | str:
        """The bytes of the first file named one of ``names`` in a matching run that hash to ``digest``; otherwise
        why not: "refused" (copies exist, none of them these bytes) or "missing" (no copy at all)."""
        seen = False
        for run in self._runs(stages, tags or {}):
            for name in names:
                data = self._read(run.info.run_id, name)
                if data is None:
                    continue
                if sha256_bytes(data) == digest:
                    return data
                seen = True
        return "refused" if seen else "missing"

    def listed(self, stages: tuple[str, ...], folder: str, tags: dict) -> list[str]:
        """Paths of the files under ``folder`` in the matching runs (where a policy copy may lie)."""
        out = []
        for run in self._runs(stages, tags):
            try:
                out += [f.path for f in self.client.list_artifacts(run.info.run_id, folder) if not f.is_dir]
            except Exception:  # noqa: BLE001
                continue
        return sorted(set(out))


def _take(pulled: Pulled, what: str, found: bytes | str, write) -> None:
    if isinstance(found, bytes):
        write(found)
    pulled.add("fetched" if isinstance(found, bytes) else found, what)


def _pull_report(store: ArtifactStore, server: ServerFiles, entry: dict, pulled: Pulled) -> Path | None:
    """The delta report an `evaluated` entry names, every file it vouches for verified; its JSON path or None."""
    aid, key = entry["artifact_id"], entry["report_key"]
    out, what = store.delta_report_dir(aid, key), f"delta report {aid}/{key}"
    files = {**(entry.get("report_files") or {}), REPORT_JSON: entry["report_sha256"]}
    if all(file_matches(out / name, digest) for name, digest in files.items()):
        pulled.add("present", what)
        return out / REPORT_JSON
    found = {
        name: server.find(("delta_report",), [name], digest, {"artifact_id": aid}) for name, digest in files.items()
    }
    bad = [name for name, data in found.items() if not isinstance(data, bytes)]
    if bad:
        pulled.add("refused" if any(found[n] == "refused" for n in bad) else "missing", f"{what} ({', '.join(bad)})")
        return None
    with atomic_directory(out) as tmp:
        for name, data in found.items():
            (tmp / name).write_bytes(data)
    pulled.add("fetched", what)
    return out / REPORT_JSON


def _pull_evals(store: ArtifactStore, server: ServerFiles, entry: dict, report: Path, pulled: Pulled) -> None:
    """The base and quantized eval tables the verdict was computed from, each checked against `eval_tables`."""
    keys = json.loads(report.read_text(encoding="utf-8"))
    tables = entry.get("eval_tables") or {}
    for label, key in (("base", keys.get("base_eval_key")), ("quantized", keys.get("eval_key"))):
        for name in EVAL_TABLES:
            digest, what = tables.get(f"{label}/{name}"), f"eval table {key}/{name}"
            if not key or not digest:
                pulled.add("missing", f"{what} (the trail entry names no hash for it)")
                continue
            path = store.eval_dir(key) / name
            if file_matches(path, digest):
                pulled.add("present", what)
                continue
            _take(pulled, what, server.find((EVAL_STAGES[label],), [name], digest),
                  lambda data, p=path: write_bytes_atomic(p, data))  # fmt: skip


def _pull_policy(store: ArtifactStore, server: ServerFiles, policy_hash: str, pulled: Pulled) -> None:
    path, what = store.policy_path(policy_hash), f"policy {policy_hash[:12]}"
    if file_matches(path, policy_hash):
        pulled.add("present", what)
        return
    found = server.find((shared_trail.TRAIL_RUN,), [f"{shared_trail.POLICY_DIR}/{policy_hash}.yaml"], policy_hash)
    if not isinstance(found, bytes):  # pinned before pins were shared: the copy each verdict under it logged
        tags = {"policy_hash": policy_hash}
        again = server.find(("delta_report",), server.listed(("delta_report",), "policy", tags), policy_hash, tags)
        found = again if isinstance(again, bytes) else ("refused" if "refused" in (found, again) else "missing")
    _take(pulled, what, found, lambda data: write_bytes_atomic(path, data))


def rebuild_records(store: ArtifactStore | Path, tracker: MlflowTracker, model_name: str) -> Pulled:
    """Bring the model's trail, policies, delta reports and eval tables into ``store`` from the tracking server,
    keeping only files the verified trail vouches for, then write its audit report afresh."""
    from quant_pipeline.release.report import write_report

    store = ArtifactStore.of(store)
    path = store.trail_path(model_name)
    try:
        taken = shared_trail.catch_up(tracker, model_name, path)
    except shared_trail.SharedTrailError as e:
        raise RebuildError(f"cannot rebuild {model_name}: {e}") from None
    entries, problems = verified_model_trail(store, tracker, model_name)  # what follows pulls by these entries
    if problems:
        raise RebuildError(
            f"cannot rebuild {model_name}: its trail does not verify against the anchor ({problems[0]}): "
            f"nothing was taken; run `quant-pipeline verify-trail {model_name}`"
        )
    pulled = Pulled()
    kind = "fetched" if taken else "present"
    pulled.add(kind, f"trail of {model_name} ({len(entries)} entries, verified against its anchor)")
    server = ServerFiles(tracker, model_name)
    for policy_hash in dict.fromkeys(e["policy_hash"] for e in entries if e.get("policy_hash")):
        _pull_policy(store, server, policy_hash, pulled)
    for entry in (e for e in entries if e.get("event") == "evaluated" and e.get("report_sha256")):
        report = _pull_report(store, server, entry, pulled)
        if report is not None:
            _pull_evals(store, server, entry, report, pulled)
    _, page = write_report(store, tracker, model_name)
    pulled.add("written", f"audit report, from what is verified here: {page}")
    return pulled
