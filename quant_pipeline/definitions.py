"""The table of contents of quant_pipeline: every stage, check, job, sensor and resource of the audit.

base_checkpoint -> calibration_set -> quantized_artifact -> eval results (base and quantized)
-> delta_report (+ checks) -> approval -> candidate_tradeoff -> audit_report; runtime_environment feeds every
artifact ID. A model's own stages and its comparison are partitioned by model, the stages from quantized_artifact
to approval by model x candidate (`defs/candidates.py`): the base evaluation is shared by every candidate of its
model, and candidate_tradeoff compares them and recommends one.

After release, live monitoring: live_signals (model x hour: per-arm signals of the served traffic, prompt drift,
the dashboard) and its blocking check, which rolls a canary back when the rollback policy trips.
"""

import dagster as dg

from quant_pipeline.defs.automation import (
    base_model_sensor,
    calibration_data_sensor,
    next_phases_sensor,
    periodic_reaudit_schedule,
    runtime_sensor,
)
from quant_pipeline.defs.candidates import candidate_stages_job, comparison_job, model_stages_job
from quant_pipeline.defs.evaluate import base_eval_results, quantized_eval_results
from quant_pipeline.defs.gate import (
    delta_report,
    every_gated_slice_informative,
    policy_metrics_measured,
    slices_within_tolerance,
)
from quant_pipeline.defs.inputs import base_checkpoint, calibration_set, runtime_environment
from quant_pipeline.defs.monitoring import (
    canary_within_rollback_policy,
    hourly_monitoring_schedule,
    live_monitoring_job,
    live_signals,
    request_volume_sensor,
)
from quant_pipeline.defs.quantize import quantized_artifact
from quant_pipeline.defs.release import audit_report
from quant_pipeline.defs.resources import build_resources
from quant_pipeline.defs.signoff import approval
from quant_pipeline.defs.tradeoff import candidate_tradeoff, identity_moves_nothing

AUDIT_ASSETS = [
    # inputs
    base_checkpoint,
    calibration_set,
    runtime_environment,
    # quantize
    quantized_artifact,
    # evaluate
    base_eval_results,
    quantized_eval_results,
    # gate
    delta_report,
    # sign-off
    approval,
    # release
    audit_report,
    candidate_tradeoff,
]
AUDIT_CHECKS = [slices_within_tolerance, every_gated_slice_informative, policy_metrics_measured, identity_moves_nothing]
# live monitoring: one model's served traffic per hour, and the canary held to the rollback policy
MONITORING_ASSETS = [live_signals]
MONITORING_CHECKS = [canary_within_rollback_policy]

defs = dg.Definitions(
    assets=[*AUDIT_ASSETS, *MONITORING_ASSETS],
    asset_checks=[*AUDIT_CHECKS, *MONITORING_CHECKS],
    # an audit's three runs, in this order, and live monitoring's
    jobs=[model_stages_job, candidate_stages_job, comparison_job, live_monitoring_job],
    sensors=[base_model_sensor, calibration_data_sensor, runtime_sensor, next_phases_sensor, request_volume_sensor],
    schedules=[periodic_reaudit_schedule, hourly_monitoring_schedule],
    resources=build_resources(deferred=True),  # QP_* variables as dg.EnvVar, resolved per run
    # Model stages share two cores and gigabytes of weights: run them one after another in one process.
    executor=dg.in_process_executor,
)
