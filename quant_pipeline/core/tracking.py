"""MLflow as the system of record, through explicit client calls.

`dagster-mlflow` relies on MLflow's process-global active run, which breaks as soon as two stages
or two tracking URIs share a process. This resource opens and closes every run itself with
`MlflowClient`, so each stage's run ID is known and can be linked from Dagster metadata.

What an analyst sees: one experiment per base model, opened in MLflow's model-training view (the tag
`mlflow.experimentKind`, and `?workflowType=machine_learning` on every link we show, since MLflow 3.17 takes
the view from the sidebar switch or that URL parameter); one parent run per audit with a nested run per stage,
each spanning the stage's real duration; registered versions that say in their description what they are and
how they were judged.
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
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from quant_pipeline.core.paths import default_mlflow_uri, project_home
from quant_pipeline.core.registry_view import APPROVED_ALIAS
from quant_pipeline.core.store import check_name

__all__ = ["APPROVED_ALIAS", "LATEST_AUDITED_ALIAS", "MlflowTracker", "StageRun"]

AUDIT_KEY_TAG = "audit_key"  # on the audit's parent run and on each of its stage runs
AUDIT_STAGE = "audit"  # the parent run's `stage` tag
# MLflow's UI reads this experiment tag to pick the GenAI or the model-training layout (server/js: the
# ExperimentKind enum, "custom_model_development" = model training); 3.17 reads the sidebar switch instead,
# which the `workflowType` URL parameter overrides: both are set, so old and new UIs open the classic view.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"
ML_VIEW = "workflowType=machine_learning"
# The approved/production/canary aliases point at nothing after a FAIL: this one always names the version the
# newest audit judged, whatever its verdict, so the Models page shows which version the last audit was about.
LATEST_AUDITED_ALIAS = "latest-audited"
MODEL_DESCRIPTION = (
    "Every checkpoint of {name} that quant_pipeline audited: the full-precision base (tag kind=base: the baseline "
    "every candidate is judged against, and the rollback target) and each quantized candidate (kind=quantized). "
    "Aliases: `approved` = a PASS signed off by a named person, `production` = serving, `canary` = on trial, "
    f"`{LATEST_AUDITED_ALIAS}` = the version the newest audit judged, whatever its verdict. Each version's "
    "description says what it is and, once judged, its verdict and where its report is."
)


def significant(value: float, digits: int) -> float:
    """`value` to `digits` significant digits: -0.07999999999999996 is logged as -0.08."""
    return float(f"{value:.{digits}g}")


class StageRun:
    """One open MLflow run for one stage; helpers turn Python values into MLflow records."""

    def __init__(self, client: MlflowClient, run_id: str, url: str, audit_url: str | None = None):
        self.client, self.run_id, self.url, self.audit_url = client, run_id, url, audit_url

    def log_params(self, params: dict) -> None:
        flat = {k: str(v)[:6000] for k, v in params.items()}
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flat.items()])

    def log_metrics(self, metrics: dict[str, float], digits: int | None = None) -> None:
        """Log metrics (None and NaN skipped), rounded to `digits` significant digits if given: for display
        only, where a difference of two floats would show its noise; what the gate judged stays in the report."""
        now = int(time.time() * 1000)
        ok = [
            Metric(k, significant(float(v), digits) if digits else float(v), now, 0)
            for k, v in metrics.items()
            if v is not None and v == v
        ]
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
        audit = {"mlflow_audit_run": dg.MetadataValue.url(self.audit_url)} if self.audit_url else {}
        return {"mlflow_run_id": self.run_id, "mlflow_run": dg.MetadataValue.url(self.url), **audit}


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
        """One experiment per base model, so every audit of that model is comparable in one table; tagged for
        MLflow's model-training view (an experiment from before the tag, or one the UI guessed, gets it too)."""
        client = self.client()
        name = f"quant_pipeline/{check_name(model_name, 'model name')}"
        exp = client.get_experiment_by_name(name)
        if exp is not None:
            kind = exp.tags.get(EXPERIMENT_KIND_TAG)
            if kind is None or kind.endswith("_inferred"):  # a kind a person chose is theirs to keep
                client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)
            return exp.experiment_id
        try:
            return client.create_experiment(
                name,
                artifact_location=self._artifact_location(model_name),
                tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
            )
        except MlflowException:  # created concurrently
            return client.get_experiment_by_name(name).experiment_id

    @property
    def is_server(self) -> bool:
        """A tracking server (http, https): the system of record for artifacts too, reachable from every host."""
        return self.uri.split(":", 1)[0] in ("http", "https")

    def _artifact_location(self, model_name: str) -> str | None:
        """Where a new experiment keeps its artifacts: `artifact_root` if set; on a server, the server's own
        (proxied) store, so that every host reads what any host wrote; otherwise the project's `.mlflow` folder."""
        if self.artifact_root:
            return f"{self.artifact_root.rstrip('/')}/{model_name}"
        if self.is_server:
            return None
        return f"{(project_home() / '.mlflow' / 'artifacts').as_uri()}/{model_name}"

    def run_url(self, exp_id: str, run_id: str) -> str:
        return f"{self.ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}?{ML_VIEW}"

    @contextlib.contextmanager
    def stage_run(
        self,
        model_name: str,
        stage: str,
        tags: dict | None = None,
        started: float | None = None,
        audit_key: str | None = None,
    ) -> Iterator[StageRun]:
        """Open a run for one stage; it is closed FINISHED, or FAILED if the stage raises.

        The run is opened once the stage has its results (the run ID goes into the stage's metadata), so
        `started` (time.time() when the stage began, e.g. `StageMeter.started`) is its start time: without it an
        868 s evaluation would show as a 23 ms run. `audit_key` nests the run under its audit's parent run
        (`audit_run`); without one (a bench, a test) the run stands alone."""
        client = self.client()
        exp_id = self.experiment_id(model_name)
        start_ms = int(started * 1000) if started is not None else None
        run_tags = {"stage": stage, **{k: str(v) for k, v in (tags or {}).items()}}
        parent = None
        if audit_key:
            parent = self.audit_run(client, exp_id, audit_key, start_ms)
            run_tags |= {MLFLOW_PARENT_RUN_ID: parent, AUDIT_KEY_TAG: audit_key}
        run_id = client.create_run(exp_id, start_time=start_ms, tags=run_tags, run_name=stage).info.run_id
        status = "FAILED"
        try:
            yield StageRun(client, run_id, self.run_url(exp_id, run_id), parent and self.run_url(exp_id, parent))
            status = "FINISHED"
        finally:
            client.set_terminated(run_id, status)
            if parent:  # the parent ends with its latest stage, FAILED for good once one stage failed
                failed = status == "FAILED" or client.get_run(parent).info.status == "FAILED"
                client.set_terminated(parent, "FAILED" if failed else "FINISHED")

    def audit_run(self, client: MlflowClient, exp_id: str, audit_key: str, start_ms: int | None) -> str:
        """The parent run of one audit (found by its `audit_key` tag, else created starting at `start_ms`).

        The phases of an audit are separate Dagster runs, run one after another (the run queue runs one at a
        time), so find-then-create does not race in practice; the key is chosen by `defs.candidates.audit_key`.
        """
        key = check_name(audit_key, "audit key")
        found = client.search_runs(
            [exp_id], f"tags.{AUDIT_KEY_TAG} = '{key}' and tags.stage = '{AUDIT_STAGE}'", max_results=1
        )
        if found:
            return found[0].info.run_id
        name = f"audit {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime((start_ms or time.time() * 1000) / 1000))}"
        tags = {"stage": AUDIT_STAGE, AUDIT_KEY_TAG: key, "dagster_audit_root_run": key}
        return client.create_run(exp_id, start_time=start_ms, tags=tags, run_name=name).info.run_id

    # -- registry ---------------------------------------------------------------------------
    def register_artifact(
        self, model_name: str, artifact_id: str, source: str, run_id: str, tags: dict, description: str = ""
    ) -> str:
        """Register (once) a model version for an artifact ID; returns the version number. `description` (what
        the version is) is written on a new version, and on an existing one that has none yet."""
        client = self.client()
        existing = self.model_version(check_name(model_name, "model name"), check_name(artifact_id, "artifact ID"))
        if existing is not None:
            if description and not existing.description:
                client.update_model_version(model_name, existing.version, description=description)
            return existing.version
        self._ensure_registered_model(client, model_name)
        mv = client.create_model_version(
            model_name,
            source=source,
            run_id=run_id,
            tags={k: str(v) for k, v in tags.items()},
            description=description or None,
        )
        return mv.version

    def _ensure_registered_model(self, client: MlflowClient, name: str) -> None:
        """Create the registered model (with its description) if absent; describe an older one that has none."""
        try:
            model = client.get_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND"):
                raise  # a registry that cannot be read is not an absent model
            try:
                client.create_registered_model(
                    name, tags={"managed_by": "quant_pipeline"}, description=MODEL_DESCRIPTION.format(name=name)
                )
            except MlflowException:
                pass  # created concurrently
            return
        if not model.description:
            client.update_registered_model(name, description=MODEL_DESCRIPTION.format(name=name))

    def describe_judgement(self, model_name: str, version: str, judgement: str) -> None:
        """Put how a version was last judged under what it is (its description's first paragraph, written at
        registration), so its registry page answers both; a later judgement replaces the earlier one."""
        client, name = self.client(), check_name(model_name, "model name")
        what = (client.get_model_version(name, version).description or "").split("\n\n")[0]
        client.update_model_version(name, version, description=f"{what}\n\n{judgement}" if what else judgement)

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
        self._ensure_registered_model(client, name)
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
