"""Where an audit's models run and in which dtype: one setting for the base, the quantization and every candidate.

A delta must measure the quantization and nothing else. A base evaluated in float32 on the CPU against a
quantized model run in float16 on a GPU mixes a dtype (and kernel) change into every slice's delta, so all
models of an audit are placed by one setting, `QP_DEVICE` (`AuditSettings.device`): `auto` (a GPU where torch
sees one, else the CPU), `cpu` or `cuda`. On the CPU everything computes in float32. On CUDA everything computes
in float16, the dtype GPTQ's CUDA kernels compute in, so the base runs in it as well. The placement is part of
an evaluation's key and record, and the gate refuses to judge two evaluations placed differently.
"""

from __future__ import annotations

from dataclasses import dataclass

from quant_pipeline.core.errors import AuditInputError

DEVICES = ("auto", "cpu", "cuda")
COMPUTE_DTYPE = {"cpu": "float32", "cuda": "float16"}


@dataclass(frozen=True)
class Placement:
    device: str  # "cpu" or "cuda"
    dtype: str  # the compute dtype, "float32" or "float16"

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def record(self) -> dict[str, str]:
        """What an evaluation's record says of how its model ran (`execution`)."""
        return {"device": self.device, "compute_dtype": self.dtype}


CPU = Placement("cpu", COMPUTE_DTYPE["cpu"])


def placement(setting: str = "auto") -> Placement:
    """The placement a `QP_DEVICE` value names; one line naming the setting and the fix when it cannot hold."""
    if setting not in DEVICES:
        raise AuditInputError(f"device {setting!r} (`QP_DEVICE`): use one of {', '.join(DEVICES)}")
    if setting == "cpu":
        return CPU
    import torch

    if torch.cuda.is_available():
        return Placement("cuda", COMPUTE_DTYPE["cuda"])
    if setting == "cuda":
        raise AuditInputError(
            f"device 'cuda' (`QP_DEVICE`): torch {torch.__version__} sees no CUDA device here; "
            "set QP_DEVICE=cpu or auto, or install a CUDA build of torch"
        )
    return CPU


def _where(execution: dict) -> tuple[str, str]:
    """An evaluation's device and compute dtype. One recorded before placement was recorded ran on the CPU in
    float32, the only placement there was."""
    return execution.get("device", "cpu"), execution.get("compute_dtype", COMPUTE_DTYPE["cpu"])


def described(base_execution: dict, quant_execution: dict) -> str:
    """Where both sides of a delta ran, in words, for the report a reviewer reads."""
    (bd, bt), (qd, qt) = _where(base_execution), _where(quant_execution)
    return f"{bd}, {bt} (base and quantized)" if (bd, bt) == (qd, qt) else f"base {bd}, {bt}; quantized {qd}, {qt}"


def mismatch(base_execution: dict, quant_execution: dict) -> str | None:
    """Why two evaluations cannot be compared (placed on other devices or dtypes), or None."""
    base, quant = _where(base_execution), _where(quant_execution)
    if base == quant:
        return None
    return (
        f"the base ran on {base[0]} in {base[1]} and the quantized model on {quant[0]} in {quant[1]}: the delta "
        "would mix a device and dtype change into the quantization; evaluate both under one QP_DEVICE"
    )
