"""Re-audit on every change: the three audited inputs each have a sensor, plus a periodic schedule.

The audit rule: a base model update, a calibration data change or a runtime upgrade makes every
quantized model built or judged before it an unaudited risk, so each fires a re-audit of exactly
the assets that depend on what changed, tagged with what changed from which version to which.
Cursors are kept by Dagster, so a daemon restart loses nothing, and a change seen twice launches
one run (the cursor moves, and the run key repeats).
"""

import json
import os
import time
from pathlib import Path

import dagster as dg

from quant_pipeline.core.artifacts import read_artifact_record
from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.recipe import Recipe
from quant_pipeline.core.runtime import fingerprint_changes, fingerprint_hash, runtime_fingerprint
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import (
    CANDIDATE_STAGES,
    COMPARISON_STAGES,
    MODEL_STAGES,
    MODELS,
    PARTITION_TAG,
    PHASE_JOBS,
    audited,
    candidate_stages_job,
    comparison_job,
    latest_metadata,
    model_stages_job,
    phases,
)
from quant_pipeline.defs.recovery import HOST_TAG, PID_TAG
from quant_pipeline.defs.resources import AuditSettings
from quant_pipeline.models.calibration import (
    calibration_version,
    load_calibration_texts,
    tokenizer_hash_of,
    used_samples_hash,
)
from quant_pipeline.models.checkpoint import source_stat, source_version
from quant_pipeline.release.signoff import verified_model_trail

TRIGGER_TAG = "quant_pipeline/trigger"
FROM_TAG = "quant_pipeline/from_version"
TO_TAG = "quant_pipeline/to_version"
FORCE_REEVAL_TAG = "quant_pipeline/force_reeval"
STAGES_TAG = "quant_pipeline/stages"  # what the re-audit runs after its model stages succeed
CANDIDATES_TAG = "quant_pipeline/candidates"  # which of the model's candidates it re-audits
# The model every phase of a re-audit is about: the run queue's per-model limit (deploy/dagster.postgres.yaml) keys
# on it, so a model's phases run one after another while other models' run beside them.
AUDITED_MODEL_TAG = "quant_pipeline/model"

ALL_STAGES = [*MODEL_STAGES, *CANDIDATE_STAGES, *COMPARISON_STAGES]
# A calibration change cannot change the base model's scores: its eval is not re-run.
CALIBRATION_STAGES = ["calibration_set", *CANDIDATE_STAGES, *COMPARISON_STAGES]
PERIODIC_STAGES = [
    "runtime_environment",
    "base_eval_results",
    "quantized_eval_results",
    "delta_report",
    "approval",
    *COMPARISON_STAGES,
]

INTERVAL = int(os.environ.get("QP_SENSOR_INTERVAL_SECONDS", "30"))
# How often the base model sensor hashes a model's files even when their names, sizes and mtimes are unchanged:
# a copy that keeps both (`cp -p`, `rsync -t`, a restored backup) changes the content unseen by the cheap check.
FULL_HASH_SECONDS = float(os.environ.get("QP_SENSOR_FULL_HASH_HOURS", "6")) * 3600


def reaudit(
    trigger: str, previous: str, current: str, stages: list[str], audited_by_model: dict, details: str = "",
    extra: dict | None = None,
) -> list[dg.RunRequest]:  # fmt: skip
    """One run request per model: its share of `stages` (the model's own stages); tags carry what changed and
    what follows once it succeeds (each candidate's stages, then the comparison: `next_phases_sensor`)."""
    tags = {TRIGGER_TAG: trigger, FROM_TAG: previous, TO_TAG: current, STAGES_TAG: ",".join(stages), **(extra or {})}
    if details:
        tags["quant_pipeline/changes"] = details[:1000]
    model_stages = [s for s in stages if s in MODEL_STAGES]
    return [
        dg.RunRequest(
            run_key=f"{trigger}:{previous}->{current}:{model}",
            job_name=model_stages_job.name,
            asset_selection=[dg.AssetKey(s) for s in model_stages],
            tags={**tags, CANDIDATES_TAG: ",".join(keys), AUDITED_MODEL_TAG: model},
            partition_key=model,
        )
        for model, keys in audited_by_model.items()
    ]


def change_request(
    trigger: str, previous: str | None, current: str, stages: list[str], cursor: dict, audited_by_model: dict,
    details: str = "",
) -> dg.SensorResult:  # fmt: skip
    """Skip when nothing changed (saying why), else a re-audit of every model with candidates it affects."""
    cursor = {**cursor, "version": current}
    if previous is None:
        return dg.SensorResult(
            skip_reason=f"no audit recorded yet; {trigger} is at {current}. Materialize the graph once first.",
            cursor=json.dumps(cursor),
        )
    if previous == current:
        return dg.SensorResult(skip_reason=f"{trigger} unchanged at {current}", cursor=json.dumps(cursor))
    if not audited_by_model:
        return dg.SensorResult(
            skip_reason=f"{trigger} changed to {current}, but no audited candidate depends on it",
            cursor=json.dumps(cursor),
        )
    requests = reaudit(trigger, previous, current, stages, audited_by_model, details)
    return dg.SensorResult(run_requests=requests, cursor=json.dumps(cursor))


def audit_sensor(description: str):
    """A sensor that requests re-audits: running by default, every INTERVAL seconds."""
    return dg.sensor(
        jobs=[model_stages_job],
        minimum_interval_seconds=INTERVAL,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=description,
    )


@dg.run_status_sensor(
    run_status=dg.DagsterRunStatus.SUCCESS,
    monitored_jobs=[model_stages_job],
    request_jobs=[candidate_stages_job, comparison_job],
    minimum_interval_seconds=INTERVAL,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="After a re-audit's model stages succeed: each candidate's stages, then the model's comparison.",
)
def next_phases_sensor(context: dg.RunStatusSensorContext):
    """Requested together, in order: the run queue (one run at a time) runs the comparison after every
    candidate. A model run that failed requests nothing: no candidate is judged against a base that did not
    build. Runs of the model stages started by hand carry no plan and request nothing either."""
    run = context.dagster_run
    stages = [s for s in run.tags.get(STAGES_TAG, "").split(",") if s]
    if not stages:
        return dg.SkipReason(f"run {run.run_id} is not a re-audit: nothing follows it")
    model = run.tags[PARTITION_TAG]
    # the plan and what changed carry over; the finished run's process tags do not (a later run reading them would
    # take the new run for one whose process died, and fail it)
    tags = {
        k: v
        for k, v in run.tags.items()
        if k.startswith("quant_pipeline/") and k not in (STAGES_TAG, PID_TAG, HOST_TAG)
    }
    tags["quant_pipeline/after_run"] = run.run_id
    requests = []
    for phase, chosen in phases(stages):
        if phase == "model":
            continue
        keys = [k for k in run.tags.get(CANDIDATES_TAG, "").split(",") if k] if phase == "candidate" else [""]
        requests += [
            dg.RunRequest(
                run_key=f"{run.run_id}:{phase}:{key}",
                job_name=PHASE_JOBS[phase].name,
                asset_selection=[dg.AssetKey(s) for s in chosen],
                tags=tags,
                partition_key=dg.MultiPartitionKey({"model": model, "candidate": key}) if key else model,
            )
            for key in keys
        ]
    return requests


@audit_sensor("Base model: a model partition's checkpoint files changed.")
def base_model_sensor(context: dg.SensorEvaluationContext, settings: AuditSettings):
    """Every model partition's source, watched on its own: files, sizes and mtimes first (cheap), the content
    version when those moved, and every FULL_HASH_SECONDS even when they did not (a content change that keeps
    sizes and mtimes). A model never audited is left alone (nothing to compare with)."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    now = time.time()
    requests, notes, seen = [], [], {}
    audited_by_model = audited(context.instance)
    for model in context.instance.get_dynamic_partitions(MODELS.name):
        try:
            source = settings.source(model, context.instance)
        except AuditInputError as e:
            notes.append(f"{model}: unusable ({e})")
            continue
        stat, known = source_stat(source), cursor.get(model, {})
        if known.get("stat") == stat and known.get("version") and now - known.get("hashed_at", 0) < FULL_HASH_SECONDS:
            seen[model] = known
            notes.append(f"{model} unchanged at {known['version']} (same files, sizes and mtimes)")
            continue
        current = source_version(source)
        previous = known.get("version") or latest_metadata(context.instance, "base_checkpoint", "source_version", model)
        seen[model] = {"stat": stat, "version": current, "hashed_at": now}
        if previous is None or previous == current or model not in audited_by_model:
            notes.append(f"{model}: {'unchanged at ' + current if previous == current else 'no audit recorded yet'}")
            continue
        requests += reaudit("base_model", previous, current, ALL_STAGES, {model: audited_by_model[model]})
    return dg.SensorResult(
        run_requests=requests, skip_reason=None if requests else "; ".join(notes) or "no model registered yet",
        cursor=json.dumps(seen),
    )  # fmt: skip


@audit_sensor("Calibration data: the calibration file's content changed.")
def calibration_data_sensor(context: dg.SensorEvaluationContext, settings: AuditSettings, mlflow: MlflowTracker):
    """A changed file re-audits the candidates whose samples changed: an edit outside the samples a candidate
    reads cannot change its bytes, so it is skipped, saying so."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    path = Path(settings.calibration_file)
    if not path.is_file():
        return dg.SkipReason(f"calibration file {path} does not exist")
    previous = cursor.get("version") or latest_metadata(context.instance, "calibration_set", "version")
    current = calibration_version(path)
    affected = audited(context.instance, calibrated_only=True)  # a data-free candidate read no calibration
    if previous is not None and previous != current and affected:
        texts = _texts_or_none(path)
        affected = {
            model: changed
            for model, keys in affected.items()
            if (changed := _changed_candidates(context.instance, settings, mlflow, model, keys, texts))
        }
        if not affected:
            return dg.SensorResult(
                skip_reason=f"calibration changed to {current}, outside the samples every audited candidate reads "
                "(their artifacts would be byte-identical): nothing to re-audit",
                cursor=json.dumps({**cursor, "version": current}),
            )
    return change_request("calibration", previous, current, CALIBRATION_STAGES, {}, affected)


def _texts_or_none(path: Path) -> list[str] | None:
    try:
        return load_calibration_texts(path)
    except AuditInputError:  # a broken file is re-audited: that run's pre-run check refuses it in one line
        return None


def _changed_candidates(
    instance: dg.DagsterInstance,
    settings: AuditSettings,
    tracker: MlflowTracker,
    model: str,
    candidates: list[str],
    texts: list[str] | None,
) -> list[str]:
    """The candidates whose current artifact read samples that differ from those the file now holds. The read
    samples' hash comes from the model's trail, trusted only once it verifies against its MLflow anchor (an
    edited hash in the store must not silence a re-audit); anything unknown, unreadable or unverified counts as
    changed: a wrong "unchanged" costs an unaudited change, a wrong "changed" one re-audit."""
    audited_with: dict[str, dict[str, str]] = {}  # registered name -> artifact ID -> calibration hash, read once

    def hashes(model_name: str) -> dict[str, str]:
        if model_name not in audited_with:
            try:
                entries, problems = verified_model_trail(settings.store, tracker, model_name)  # one read
                entries = entries if not problems else []
            except (AuditInputError, OSError, ValueError):  # no trail, or one that cannot be read: nothing known
                entries = []
            audited_with[model_name] = {
                e["artifact_id"]: e.get("calibration_hash") for e in entries if e.get("event") == "audit"
            }  # the latest audit of each artifact wins
        return audited_with[model_name]

    def changed(candidate: str) -> bool:
        key = dg.MultiPartitionKey({"model": model, "candidate": candidate})
        aid = latest_metadata(instance, "quantized_artifact", "artifact_id", key)
        try:
            record = read_artifact_record(settings.store, aid) if texts is not None and aid else None
            if record is None or len(texts) < record.recipe["calibration_samples"]:
                return True
            used = used_samples_hash(texts, Recipe(**record.recipe), tokenizer_hash_of(Path(record.base_path)))
            return hashes(record.model_name).get(aid) != used
        except (AuditInputError, OSError, ValueError):
            return True

    return [c for c in candidates if changed(c)]


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
    affected = audited(context.instance)
    return change_request("runtime", recorded_hash, current_hash, ALL_STAGES, {}, affected, details=changes)


@dg.schedule(
    job=model_stages_job,
    cron_schedule=os.environ.get("QP_REAUDIT_CRON", "0 6 * * 1"),  # Mondays 06:00
    default_status=dg.DefaultScheduleStatus.STOPPED
    if os.environ.get("QP_REAUDIT_SCHEDULE", "on") == "off"
    else dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Weekly re-evaluation of every audited candidate's current artifact even when nothing changed "
        "(QP_REAUDIT_CRON, QP_REAUDIT_SCHEDULE=off); each model's base first, its candidates after."
    ),
)
def periodic_reaudit_schedule(context: dg.ScheduleEvaluationContext):
    affected = audited(context.instance)
    if not affected:
        return dg.SkipReason("no candidate audited yet: audit one first")
    tick = context.scheduled_execution_time.isoformat() if context.scheduled_execution_time else "now"
    return reaudit("schedule", "-", tick, PERIODIC_STAGES, affected, extra={FORCE_REEVAL_TAG: "true"})
