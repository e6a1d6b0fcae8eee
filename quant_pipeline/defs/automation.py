"""Re-audit on every change: the three audited inputs each have a sensor, plus a periodic schedule.

The audit rule: a base model update, a calibration data change or a runtime upgrade makes every
quantized model built or judged before it an unaudited risk, so each fires a re-audit of exactly
the assets that depend on what changed, tagged with what changed from which version to which.
Cursors are kept by Dagster, so a daemon restart loses nothing, and a change seen twice launches
one run (the cursor moves, and the run key repeats).
"""

import json
import os
from pathlib import Path

import dagster as dg

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.runtime import fingerprint_changes, fingerprint_hash, runtime_fingerprint
from quant_pipeline.defs.candidates import candidates
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.models.calibration import calibration_version
from quant_pipeline.models.checkpoint import resolve_model_source, source_stat, source_version

TRIGGER_TAG = "quant_pipeline/trigger"
FROM_TAG = "quant_pipeline/from_version"
TO_TAG = "quant_pipeline/to_version"
FORCE_REEVAL_TAG = "quant_pipeline/force_reeval"

ALL_STAGES = [
    "base_checkpoint",
    "calibration_set",
    "runtime_environment",
    "quantized_artifact",
    "base_eval_results",
    "quantized_eval_results",
    "delta_report",
    "approval",
    "audit_report",
    "candidate_tradeoff",
]
# A calibration change cannot change the base model's scores: its eval is not re-run.
CALIBRATION_STAGES = [
    "calibration_set",
    "quantized_artifact",
    "quantized_eval_results",
    "delta_report",
    "approval",
    "audit_report",
    "candidate_tradeoff",
]
PERIODIC_STAGES = [
    "runtime_environment",
    "base_eval_results",
    "quantized_eval_results",
    "delta_report",
    "approval",
    "audit_report",
    "candidate_tradeoff",
]

INTERVAL = int(os.environ.get("QP_SENSOR_INTERVAL_SECONDS", "30"))

full_audit_job = dg.define_asset_job(
    "full_audit", selection=ALL_STAGES, description="Every stage, base checkpoint to approval."
)
periodic_reaudit_job = dg.define_asset_job(
    "periodic_reaudit",
    selection=PERIODIC_STAGES,
    tags={TRIGGER_TAG: "schedule", FORCE_REEVAL_TAG: "true"},
    description="Re-evaluate the current artifacts and re-judge them, even when no input changed.",
)


def latest_metadata(instance: dg.DagsterInstance, asset: str, key: str):
    event = instance.get_latest_materialization_event(dg.AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return None
    value = event.asset_materialization.metadata.get(key)
    return getattr(value, "value", value)


def change_request(
    trigger: str,
    previous: str | None,
    current: str,
    stages: list[str],
    cursor: dict,
    keys: list[str],
    details: str = "",
) -> dg.SensorResult | dg.SkipReason:
    """Skip when nothing changed (saying why), else one run request per candidate partition in `keys`, for the
    affected stages (the shared base stages run in the first and are reused by the others)."""
    cursor = {**cursor, "version": current}
    if previous is None:
        return dg.SensorResult(
            skip_reason=f"no audit recorded yet; {trigger} is at {current}. Materialize the graph once first.",
            cursor=json.dumps(cursor),
        )
    if previous == current:
        return dg.SensorResult(skip_reason=f"{trigger} unchanged at {current}", cursor=json.dumps(cursor))
    if not keys:
        return dg.SensorResult(
            skip_reason=f"{trigger} changed to {current}, but no candidate it affects is registered",
            cursor=json.dumps(cursor),
        )
    tags = {TRIGGER_TAG: trigger, FROM_TAG: previous, TO_TAG: current}
    if details:
        tags["quant_pipeline/changes"] = details[:1000]
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"{trigger}:{previous}->{current}:{key}",
                asset_selection=[dg.AssetKey(s) for s in stages],
                tags=tags,
                partition_key=key,
            )
            for key in keys
        ],
        cursor=json.dumps(cursor),
    )


def audit_sensor(description: str):
    """A sensor that requests re-audits: running by default, every INTERVAL seconds."""
    return dg.sensor(
        job=full_audit_job,
        minimum_interval_seconds=INTERVAL,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
    )


@audit_sensor("Base model: the configured checkpoint's files changed, or the config names another model.")
def base_model_sensor(context: dg.SensorEvaluationContext, settings: AuditSettings):
    cursor = json.loads(context.cursor) if context.cursor else {}
    try:
        source = resolve_model_source(settings.model)
    except AuditInputError as e:
        return dg.SkipReason(f"model setting unusable: {e}")
    stat = source_stat(source)
    if cursor.get("stat") == stat and cursor.get("version"):
        return dg.SkipReason(f"base model unchanged at {cursor['version']} (same files, sizes and mtimes)")
    previous = cursor.get("version") or latest_metadata(context.instance, "base_checkpoint", "source_version")
    keys = candidates(context.instance)
    return change_request("base_model", previous, source_version(source), ALL_STAGES, {"stat": stat}, keys)


@audit_sensor("Calibration data: the calibration file's content changed.")
def calibration_data_sensor(context: dg.SensorEvaluationContext, settings: AuditSettings):
    cursor = json.loads(context.cursor) if context.cursor else {}
    path = Path(settings.calibration_file)
    if not path.is_file():
        return dg.SkipReason(f"calibration file {path} does not exist")
    previous = cursor.get("version") or latest_metadata(context.instance, "calibration_set", "version")
    keys = candidates(context.instance, calibrated_only=True)  # a data-free candidate read no calibration
    return change_request("calibration", previous, calibration_version(path), CALIBRATION_STAGES, {}, keys)


@audit_sensor("Runtime: the fingerprint recorded with the latest audit differs from the current one.")
def runtime_sensor(context: dg.SensorEvaluationContext):
    cursor = json.loads(context.cursor) if context.cursor else {}
    current = runtime_fingerprint()
    current_hash = fingerprint_hash(current)[:16]
    recorded = latest_metadata(context.instance, "runtime_environment", "fingerprint")
    if recorded is None:
        return dg.SkipReason("no audit recorded yet: nothing to compare the runtime with")
    recorded_hash = fingerprint_hash(recorded)[:16]
    if recorded_hash == current_hash:
        return dg.SensorResult(
            skip_reason=f"runtime unchanged at {current_hash}", cursor=json.dumps({"version": current_hash})
        )
    if cursor.get("version") == current_hash:
        return dg.SkipReason(f"re-audit for runtime {current_hash} already requested")
    changes = "; ".join(fingerprint_changes(recorded, current))
    keys = candidates(context.instance)
    return change_request("runtime", recorded_hash, current_hash, ALL_STAGES, {}, keys, details=changes)


@dg.schedule(
    job=periodic_reaudit_job,
    cron_schedule=os.environ.get("QP_REAUDIT_CRON", "0 6 * * 1"),  # Mondays 06:00
    default_status=dg.DefaultScheduleStatus.STOPPED
    if os.environ.get("QP_REAUDIT_SCHEDULE", "on") == "off"
    else dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Weekly re-evaluation of every candidate's current artifact even when nothing changed "
        "(QP_REAUDIT_CRON, QP_REAUDIT_SCHEDULE=off)."
    ),
)
def periodic_reaudit_schedule(context: dg.ScheduleEvaluationContext):
    keys = candidates(context.instance)
    if not keys:
        return dg.SkipReason("no candidate registered yet: audit one first")
    tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    return [dg.RunRequest(run_key=f"schedule:{tick}:{key}", partition_key=key) for key in keys]
