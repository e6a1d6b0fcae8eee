"""The table of contents of quant_pipeline: every stage, check and resource of the audit."""

import dagster as dg

from quant_pipeline.approval import approval
from quant_pipeline.audit_report import audit_report
from quant_pipeline.base_checkpoint import base_checkpoint
from quant_pipeline.calibration_set import calibration_set
from quant_pipeline.delta_report import delta_report, policy_metrics_measured, slices_within_tolerance
from quant_pipeline.eval_results import base_eval_results, quantized_eval_results
from quant_pipeline.quantized_artifact import quantized_artifact
from quant_pipeline.runtime_environment import runtime_environment
from quant_pipeline.sensors import (
    base_model_sensor,
    calibration_data_sensor,
    full_audit_job,
    periodic_reaudit_job,
    periodic_reaudit_schedule,
    runtime_sensor,
)
from quant_pipeline.settings import AuditSettings
from quant_pipeline.tracking import MlflowTracker

AUDIT_ASSETS = [
    base_checkpoint,
    calibration_set,
    runtime_environment,
    quantized_artifact,
    base_eval_results,
    quantized_eval_results,
    delta_report,
    approval,
    audit_report,
]
AUDIT_CHECKS = [slices_within_tolerance, policy_metrics_measured]

def build_resources(**settings_overrides) -> dict:
    import os

    return {
        "settings": AuditSettings.from_env(**settings_overrides),
        "mlflow": MlflowTracker(
            **{k: v for k, v in {"tracking_uri": os.environ.get("QP_MLFLOW_TRACKING_URI"), "ui_url": os.environ.get("QP_MLFLOW_UI_URL")}.items() if v}
        ),
    }


defs = dg.Definitions(
    assets=AUDIT_ASSETS,
    asset_checks=AUDIT_CHECKS,
    jobs=[full_audit_job, periodic_reaudit_job],
    sensors=[base_model_sensor, calibration_data_sensor, runtime_sensor],
    schedules=[periodic_reaudit_schedule],
    resources=build_resources(),
    # Model stages share two cores and gigabytes of weights: run them one after another in one process.
    executor=dg.in_process_executor,
)
