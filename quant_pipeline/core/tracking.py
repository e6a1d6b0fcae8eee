"""MLflow as the system of record, through explicit client calls.

`dagster-mlflow` relies on MLflow's process-global active run, which breaks as soon as two stages
or two tracking URIs share a process. This resource opens and closes every run itself with
`MlflowClient`, so each stage's run ID is known and can be linked from Dagster metadata.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from quant_pipeline.core.paths import default_mlflow_uri, project_home
from quant_pipeline.core.registry_view import APPROVED_ALIAS
from quant_pipeline.core.store import check_name

__all__ = ["APPROVED_ALIAS", "MlflowTracker", "StageRun"]


class StageRun:
    """One open MLflow run for one stage; helpers turn Python values into MLflow records."""

    def __init__(self, client: MlflowClient, run_id: str, url: str):
        self.client, self.run_id, self.url = client, run_id, url

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:6000] for k, v in params.items()}
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        ok = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and v == v]
        for i in range(0, len(ok), 900):
            self.client.log_batch(self.run_id, metrics=ok[i : i + 900])

    def set_tags(self, tags: dict) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_json(self, obj: object, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(self.run_id, str(p))

    def log_file(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def metadata(self) -> dict:
        return {"mlflow_run_id": self.run_id, "mlflow_run": dg.MetadataValue.url(self.url)}


class MlflowTracker(dg.ConfigurableResource):
    """Tracking + registry location. Defaults to a project-local SQLite file; point it at a server
    with QP_MLFLOW_TRACKING_URI (and QP_MLFLOW_UI_URL for the links shown in Dagster)."""

    tracking_uri: str = ""  # empty: the project-local SQLite file (resolved when used, not at import)
    registry_uri: str = ""
    artifact_root: str = ""
    ui_url: str = "http://127.0.0.1:5000"

    @property
    def uri(self) -> str:
        return self.tracking_uri or default_mlflow_uri()

    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.uri, registry_uri=self.registry_uri or self.uri)

    def experiment_id(self, model_name: str) -> str:
        """One experiment per base model, so every audit of that model is comparable in one table."""
        client = self.client()
        name = f"quant_pipeline/{check_name(model_name, 'model name')}"
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        root = self.artifact_root or (project_home() / ".mlflow" / "artifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=f"{root.rstrip('/')}/{model_name}")
        except MlflowException:  # created concurrently
            return client.get_experiment_by_name(name).experiment_id

    @contextlib.contextmanager
    def stage_run(self, model_name: str, stage: str, tags: dict | None = None) -> Iterator[StageRun]:
        """Open a run for one stage; it is closed FINISHED, or FAILED if the stage raises."""
        client = self.client()
        exp_id = self.experiment_id(model_name)
        run = client.create_run(
            exp_id, run_name=stage, tags={"stage": stage, **{k: str(v) for k, v in (tags or {}).items()}}
        )
        run_id = run.info.run_id
        url = f"{self.ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
        try:
            yield StageRun(client, run_id, url)
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        client.set_terminated(run_id, "FINISHED")

    # -- registry ---------------------------------------------------------------------------
    def register_artifact(self, model_name: str, artifact_id: str, source: str, run_id: str, tags: dict) -> str:
        """Register (once) a model version for an artifact ID; returns the version number."""
        client = self.client()
        existing = self.find_version(check_name(model_name, "model name"), check_name(artifact_id, "artifact ID"))
        if existing is not None:
            return existing
        try:
            client.create_registered_model(model_name, tags={"managed_by": "quant_pipeline"})
        except MlflowException:
            pass  # already exists
        mv = client.create_model_version(
            model_name, source=source, run_id=run_id, tags={k: str(v) for k, v in tags.items()}
        )
        return mv.version

    def model_version(self, model_name: str, artifact_id: str):
        """The registry version holding `artifact_id`, with its tags and aliases (None if there is none)."""
        try:
            # both names are checked first: nothing from a command line reaches the filter string unchecked
            name, aid = check_name(model_name, "model name"), check_name(artifact_id, "artifact ID")
            found = self.client().search_model_versions(f"name='{name}' and tag.artifact_id='{aid}'")
            # a search result carries no aliases: the version itself does
            return self.client().get_model_version(name, found[0].version) if found else None
        except MlflowException:
            return None

    def base_model_version(self, model_name: str, base_hash: str | None = None):
        """The base model's version: the newest one with `base_hash` if given and present, else the newest."""
        try:
            name = check_name(model_name, "model name")
            found = self.client().search_model_versions(f"name='{name}' and tag.kind='base'")
        except MlflowException:
            return None
        found = sorted(found, key=lambda v: int(v.version), reverse=True)
        same = [v for v in found if base_hash and v.tags.get("content_hash") == base_hash]
        return (same or found or [None])[0]

    def alias_model_version(self, model_name: str, alias: str):
        """The version an alias points at (None if the alias or the model does not exist)."""
        try:
            return self.client().get_model_version_by_alias(
                check_name(model_name, "model name"), check_name(alias, "alias")
            )
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise  # a registry that cannot be read is not an absent alias

    def find_version(self, model_name: str, artifact_id: str) -> str | None:
        mv = self.model_version(model_name, artifact_id)
        return mv.version if mv else None

    def delete_version(self, model_name: str, version: str) -> None:
        self.client().delete_model_version(model_name, version)

    def set_version_tags(self, model_name: str, version: str, tags: dict) -> None:
        client = self.client()
        for k, v in tags.items():
            client.set_model_version_tag(model_name, version, k, str(v))

    def set_alias(self, model_name: str, alias: str, version: str) -> None:
        self.client().set_registered_model_alias(
            check_name(model_name, "model name"), check_name(alias, "alias"), version
        )

    def alias_version(self, model_name: str, alias: str) -> str | None:
        mv = self.alias_model_version(model_name, alias)
        return mv.version if mv else None

    def set_model_tags(self, model_name: str, tags: dict) -> None:
        """Tag the registered model itself (created if it does not exist yet).

        The audit trail's anchor lives here: a tag on the registered model is outside the store, so
        whoever can rewrite the store's files still cannot make a shortened or replaced trail match it.
        """
        client = self.client()
        name = check_name(model_name, "model name")
        try:
            client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise  # a registry that cannot be read is not an absent model
            try:
                client.create_registered_model(name, tags={"managed_by": "quant_pipeline"})
            except MlflowException:
                pass  # created concurrently
        for k, v in tags.items():
            client.set_registered_model_tag(name, k, str(v))

    def model_tags(self, model_name: str) -> dict[str, str] | None:
        """The registered model's tags; None if no model of that name is registered."""
        try:
            return dict(self.client().get_registered_model(check_name(model_name, "model name")).tags)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                return None
            raise
