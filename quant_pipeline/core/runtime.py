"""The runtime environment: the software and hardware a quantized model is built and judged on.

The same artifact can behave differently after a torch, kernel or hardware change; so the runtime
is an input of every artifact ID, and its fingerprint is recorded with every audit.
"""

import importlib.metadata
import platform
import subprocess

from quant_pipeline.core.hashing import canonical_hash

LIBRARIES = (
    "torch", "transformers", "optimum", "gptqmodel", "torchao", "bitsandbytes", "hqq", "lm_eval", "accelerate",
    "safetensors", "numpy",
)  # fmt: skip
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


def _cpu() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model in ("", "unknown", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    flags = [f for f in ISA_FLAGS if f in present]
                    break
    except OSError:
        pass
    return model, flags


def runtime_fingerprint() -> dict:
    """Versions, CPU model and ISA, GPU and driver: everything that changes numerics, nothing volatile."""
    import torch

    libs = {}
    for name in LIBRARIES:
        try:
            libs[name] = importlib.metadata.version(name.replace("_", "-") if name == "lm_eval" else name)
        except importlib.metadata.PackageNotFoundError:
            libs[name] = "not installed"
    cpu_model, flags = _cpu()
    gpu = {}
    if torch.cuda.is_available():
        gpu = {"name": torch.cuda.get_device_name(0), "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
        try:
            gpu["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            gpu["driver"] = "unknown"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "libraries": libs,
        "cpu": {"model": cpu_model, "isa": flags},
        "gpu": gpu or None,
    }


def fingerprint_hash(fp: dict) -> str:
    return canonical_hash(fp)


def fingerprint_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences, e.g. ['libraries.torch: 2.12.0 -> 2.13.0']."""
    out = []
    for key in sorted(set(old or {}) | set(new or {})):
        a, b = (old or {}).get(key), (new or {}).get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            out += fingerprint_changes(a or {}, b or {}, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a} -> {b}")
    return out
