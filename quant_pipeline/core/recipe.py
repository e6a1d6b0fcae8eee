"""The quantization recipe: part of every artifact's identity, so it lives with the records."""

from __future__ import annotations

import dagster as dg

from quant_pipeline.core.errors import AuditInputError


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
            raise AuditInputError(
                f"recipe.group_size={self.group_size}: use a positive group size (e.g. 64) or -1 for per-channel"
            )
        if not 0 < self.damp_percent < 1:
            raise AuditInputError(
                f"recipe.damp_percent={self.damp_percent}: must lie strictly between 0 and 1 (0.1 is usual)"
            )
        if self.calibration_samples < 1:
            raise AuditInputError(f"recipe.calibration_samples={self.calibration_samples}: need at least 1")
        if self.seq_len < 8:
            raise AuditInputError(f"recipe.seq_len={self.seq_len}: need at least 8 tokens per calibration sample")

    def as_dict(self) -> dict:
        return {"method": "gptq", **self.model_dump()}
