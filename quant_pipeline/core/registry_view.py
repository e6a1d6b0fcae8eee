"""MLflow's model registry read without importing MLflow: what the read-only CLI verbs need.

`show`, `verify-trail` and `show-policy` answer from the store plus a few registry reads (the trail's
anchor tags on the registered model, a version's tags and aliases). Importing MLflow and opening its
SQLAlchemy store takes 3-4 s on these machines, far more than the rest of those verbs; reading the
registry's tables takes milliseconds. Only a SQLite registry whose schema revision this module was
checked against is read here, through a read-only connection; any other store (a server, an unknown
schema, a file not created yet) goes through `MlflowTracker`, so an MLflow upgrade makes these verbs
slower, never wrong. `test_registry_view` compares every read with MLflow's own client on one registry.
Writes always go through MLflow.
"""

from __future__ import annotations

import sqlite3
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from quant_pipeline.core.store import check_name

APPROVED_ALIAS = "approved"
CANARY_ALIAS = "canary"  # an approved version serving a share of live traffic (release/canary.py)
# Alembic revisions of MLflow's SQL schema whose registry tables this reader was checked against (the
# installed MLflow's newest; a test fails when an upgrade creates another, so the list is re-checked).
SCHEMA_REVISIONS = frozenset({"dc11669786a5"})
_DELETED_STAGE = "Deleted_Internal"  # MLflow keeps a deleted version's row, marked with this stage
_WORKSPACE = "default"  # MLflow filters every registry query on the active workspace; ours is the default


class RegistryReader(Protocol):
    """What read-only release functions need of the registry: `MlflowTracker` and `RegistryView` both have it."""

    def model_tags(self, model_name: str) -> dict[str, str] | None: ...

    def model_version(self, model_name: str, artifact_id: str): ...

    def find_version(self, model_name: str, artifact_id: str) -> str | None: ...


@dataclass(frozen=True)
class VersionView:
    """A registered model version as the read verbs use it (MLflow's `ModelVersion` has these too)."""

    name: str
    version: str
    tags: dict[str, str]
    aliases: list[str]


class RegistryView:
    """Read-only registry reads from MLflow's SQLite file (see the module docstring for when)."""

    def __init__(self, db: Path):
        self.db = db

    @classmethod
    def of(cls, uri: str) -> RegistryView | None:
        """A view of the registry at `uri`, or None where only MLflow itself can read it."""
        if not uri.startswith("sqlite:///") or "?" in uri:
            return None
        db = Path(uri.removeprefix("sqlite:///"))
        if not db.is_file():
            return None
        view = cls(db)
        try:
            with view._connect() as con:
                revision = con.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.Error:
            return None
        return view if revision and revision[0] in SCHEMA_REVISIONS else None

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{urllib.request.pathname2url(str(self.db))}?mode=ro", uri=True)

    def _rows(self, sql: str, *args) -> list[tuple]:
        con = self._connect()
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def model_tags(self, model_name: str) -> dict[str, str] | None:
        """The registered model's tags; None if no model of that name is registered."""
        name = check_name(model_name, "model name")
        if not self._rows("SELECT 1 FROM registered_models WHERE name = ? AND workspace = ?", name, _WORKSPACE):
            return None
        rows = self._rows(
            "SELECT key, value FROM registered_model_tags WHERE name = ? AND workspace = ?", name, _WORKSPACE
        )
        return dict(rows)

    def model_version(self, model_name: str, artifact_id: str) -> VersionView | None:
        """The version holding `artifact_id`, picked as MLflow's search orders them (newest update first)."""
        name, aid = check_name(model_name, "model name"), check_name(artifact_id, "artifact ID")
        found = self._rows(
            "SELECT v.version FROM model_versions v JOIN model_version_tags t "
            "ON t.name = v.name AND t.version = v.version AND t.workspace = v.workspace "
            "WHERE v.name = ? AND v.workspace = ? AND v.current_stage != ? AND t.key = 'artifact_id' AND t.value = ? "
            "ORDER BY v.last_updated_time DESC, v.version DESC LIMIT 1",
            name, _WORKSPACE, _DELETED_STAGE, aid,
        )  # fmt: skip
        return self._version(name, found[0][0]) if found else None

    def _version(self, name: str, version: int) -> VersionView:
        where = "WHERE name = ? AND version = ? AND workspace = ?"
        tags = self._rows(f"SELECT key, value FROM model_version_tags {where}", name, version, _WORKSPACE)
        aliases = self._rows(f"SELECT alias FROM registered_model_aliases {where}", name, version, _WORKSPACE)
        return VersionView(name, str(version), dict(tags), sorted(a for (a,) in aliases))

    def find_version(self, model_name: str, artifact_id: str) -> str | None:
        mv = self.model_version(model_name, artifact_id)
        return mv.version if mv else None
