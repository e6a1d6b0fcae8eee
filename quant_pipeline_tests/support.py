"""Helpers shared by the tests (fixtures live in conftest.py)."""

import contextlib
import json
import shutil
import tempfile
from pathlib import Path

import dagster as dg
import pytest

from quant_pipeline.core.paths import DEFAULT_CALIBRATION
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.definitions import AUDIT_ASSETS, AUDIT_CHECKS
from quant_pipeline.defs.candidates import AuditRuns, register, run_phases
from quant_pipeline.defs.resources import AuditSettings

TINY_RECIPE = Recipe(bits=4, group_size=64, calibration_samples=8, seq_len=64)
# A random tiny model has no skill to lose: its accuracy is at chance (uninformative, so INCOMPLETE). Its
# agreement with its own base is always informative, so a lenient bar on that lets the gate PASS.
LENIENT = "name: lenient\nmin_items: 1\ntolerances:\n  top1_agreement: {direction: higher_is_better, tolerance: 1.0}\n"


def run_audit(
    settings: AuditSettings,
    tracker: MlflowTracker,
    instance,
    approver: str = "",
    note: str = "",
    selection=None,
    tags: dict | None = None,
) -> AuditRuns:
    """Materialize the audit graph (or a selection of it) for the settings' model and candidate, with real
    resources, in the runs it takes (the model's stages, the candidate's, the comparison); never raises."""

    def execute(phase: str, stages: list[str], partition_key):
        return dg.materialize(
            [*AUDIT_ASSETS, *AUDIT_CHECKS],
            resources={"settings": settings, "mlflow": tracker},
            instance=instance,
            run_config={"ops": {"approval": {"config": {"approver": approver, "note": note}}}}
            if "approval" in stages
            else None,
            raise_on_error=False,
            selection=stages,
            tags=tags,
            partition_key=partition_key,
        )

    model = register(instance, settings.model, settings.recipe)
    return run_phases(execute, [str(s) for s in selection] if selection is not None else None, model, settings.recipe)


def real_model_audit(
    store: Path, tracker: MlflowTracker, instance, model: str, seq_len: int, eval_limit: int, max_new_tokens: int
) -> tuple[AuditSettings, AuditRuns, dict]:
    """Audit a packaged real model with one 4-bit GPTQ candidate at sizes for CI (8 calibration samples; the
    suite cut to `eval_limit` items per slice). Returns the settings, the runs and each side's eval values by
    (category, metric), so a slow test states only what it expects of that model."""
    import pandas as pd

    settings = AuditSettings(
        model=model,
        store_dir=str(store),
        recipe=Recipe(bits=4, group_size=64, calibration_samples=8, seq_len=seq_len),
        eval_limit=eval_limit,
        eval_max_new_tokens=max_new_tokens,
    )
    result = run_audit(settings, tracker, instance)
    assert result.success  # whatever the verdict, the audit completes its record
    evals = {
        label: pd.read_parquet(result.output_for_node(f"{label}_eval_results")["results_path"]).set_index(
            ["category", "metric"]
        )["value"]
        for label in ("base", "quantized")
    }
    return settings, result, evals


def edit_first_sample(calibration: Path, text: str) -> None:
    """Rewrite the calibration file's first sample, one every calibrated recipe reads: a change that must re-audit
    (a line after the samples a recipe reads changes no artifact, and the calibration sensor skips it)."""
    lines = calibration.read_text().splitlines()
    calibration.write_text("\n".join([json.dumps({"text": text}), *lines[1:]]) + "\n")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def replace(settings: AuditSettings, **changes) -> AuditSettings:
    """A new settings resource with some fields changed (a resource's `model_copy` keeps its old config)."""
    return AuditSettings(**{**{name: getattr(settings, name) for name in AuditSettings.model_fields}, **changes})


_EMPTY_MLFLOW_DB: list[Path] = []


def mlflow_db(directory: Path) -> str:
    """The tracking URI of an MLflow SQLite store at ``directory``/mlflow.db, copied (when there is none yet) from
    an empty store MLflow created once in this process: its schema migrations take seconds a database, and about
    every test makes one. The copy is MLflow's own empty database (its `Default` experiment is never used: the
    tracker creates each model's experiment with its own artifact location)."""
    target = Path(directory) / "mlflow.db"
    if not target.exists():
        if not _EMPTY_MLFLOW_DB:
            template = Path(tempfile.mkdtemp(prefix="qp-mlflow-template-")) / "mlflow.db"
            MlflowTracker(tracking_uri=f"sqlite:///{template}").client().search_experiments()
            _EMPTY_MLFLOW_DB.append(template)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(_EMPTY_MLFLOW_DB[0], target)
    return f"sqlite:///{target}"


def audit_world(root: Path, tiny_llama: Path):
    """Settings and tracker of an audit whose every file (store, MLflow, Dagster, inputs) lies under root."""
    settings = AuditSettings(
        model=str(tiny_llama), store_dir=str(root / "store"), recipe=TINY_RECIPE, eval_limit=4, eval_max_new_tokens=16,
        policy_file=str(root / "policy.yaml"), calibration_file=str(root / "calibration.jsonl"),
    )  # fmt: skip
    tracker = MlflowTracker(tracking_uri=mlflow_db(root), artifact_root=(root / "mlartifacts").as_uri())
    return settings, tracker


def fresh_audit_world(root: Path, tiny_llama: Path):
    """`audit_world` on a new root: the lenient policy, the shipped calibration file and Dagster's folder in place."""
    (root / "policy.yaml").write_text(LENIENT)
    shutil.copy(DEFAULT_CALIBRATION, root / "calibration.jsonl")
    (root / "dagster").mkdir()
    return audit_world(root, tiny_llama)


@contextlib.contextmanager
def cli_home(home: Path):
    """The environment `quant-pipeline` reads, pointed at an empty store and MLflow registry under ``home``
    (the MLflow tables created first: MLflow logs that on stderr, where the CLI's refusals are read)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QP_STORE_DIR", str(home / "store"))
        mp.setenv("QP_MLFLOW_TRACKING_URI", mlflow_db(home))
        mp.setenv("DAGSTER_HOME", str(home / "dagster"))
        tracker = MlflowTracker(tracking_uri=mlflow_db(home))
        yield ArtifactStore(home / "store"), tracker


def change_policy(settings: AuditSettings, tracker: MlflowTracker, model_name: str, text: str) -> dict:
    """Rewrite the audit's policy file and pin it for the model, on the record, as a policy owner would."""
    from quant_pipeline.release.governing import pin_policy

    Path(settings.policy_file).write_text(text)
    return pin_policy(settings.store, tracker, model_name, Path(settings.policy_file), "Policy Owner", "new bar")
