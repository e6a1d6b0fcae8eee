"""Live monitoring as Dagster assets: one window of one model's traffic at a time, and the canary's rollback.

`live_signals` is partitioned by model x hour, so each window keeps its own history, staleness and runs in
the UI, and a late re-run of a window (more requests arrived) replaces just that window. It is requested two
ways: an hourly schedule for the hour just ended, and a sensor after every N new requests (for the current,
still open hour: a canary that fails every request should not wait for the top of the hour). The blocking
check `canary_within_rollback_policy` applies the rollback policy to the same window and, when it trips,
takes the canary off traffic itself (`release/canary.py`) and fails with the evidence: no person in the loop
for the cheap, safe direction. The work is in `monitoring/` (pure) and `release/canary.py`; this module only
wires it to partitions, resources, MLflow and metadata.
"""

import datetime as dt
import json
import os
from pathlib import Path

import dagster as dg
from mlflow.entities import Metric

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.tracking import MlflowTracker
from quant_pipeline.defs.candidates import MODELS
from quant_pipeline.defs.resources import AuditSettings, MonitoringSettings
from quant_pipeline.monitoring.dashboard import WindowRecord, png_markdown, save_window, write_dashboard
from quant_pipeline.monitoring.drift import detect_drift
from quant_pipeline.monitoring.requests import count_requests, read_log
from quant_pipeline.monitoring.rollback import about_version, evaluate, load_rollback_policy
from quant_pipeline.monitoring.signals import WindowSignals, window_signals
from quant_pipeline.release.canary import CANARY_ALIAS, CANARY_ROLLED_BACK, CANARY_SET, roll_back_canary
from quant_pipeline.release.trail import read_entries

WINDOWS = dg.HourlyPartitionsDefinition(
    start_date=os.environ.get("QP_MONITORING_START", "2026-01-01-00:00"),
    end_offset=1,  # the hour in progress is a partition too: the request-volume sensor measures it early
)
LIVE = dg.MultiPartitionsDefinition({"model": MODELS, "window": WINDOWS})
EVERY_N_REQUESTS = int(os.environ.get("QP_MONITOR_EVERY_N_REQUESTS", "100"))
INTERVAL = int(os.environ.get("QP_SENSOR_INTERVAL_SECONDS", "30"))
MONITORING_ON = os.environ.get("QP_MONITORING", "on") != "off"  # off: the schedule and the sensor start stopped
MLFLOW_RUN = "live_monitoring"  # one MLflow run per model holds every window's metrics, step = window start
TRIGGER_TAG = "quant_pipeline/trigger"
LATENCY_SAMPLES = {"arms": {"__all__": {"latencies"}}, "shadow": {"__all__": {"latencies"}}}  # stored, not shown


def window_of(key: dg.MultiPartitionKey | str) -> tuple[str, dg.TimeWindow]:
    """The model key and the hour [start, end) of a live_signals partition."""
    key = key if isinstance(key, dg.MultiPartitionKey) else LIVE.get_partition_key_from_str(key)
    parts = key.keys_by_dimension
    return parts["model"], WINDOWS.time_window_for_partition_key(parts["window"])


def live_key(model: str, start: dt.datetime) -> dg.MultiPartitionKey:
    """The live_signals partition of a model and the hour holding `start` (any time in it: the sensor passes now;
    WINDOWS.fmt has minutes, so the time is cut to the hour first, or the key names no partition)."""
    hour = start.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0)
    return dg.MultiPartitionKey({"model": model, "window": hour.strftime(WINDOWS.fmt)})


def model_name_of(model_key: str, instance: dg.DagsterInstance | None = None) -> str:
    """The registered model name (the request log's and the trail's) of a model partition key: the audit's
    naming (QP_MODEL_NAME for the model QP_MODEL names, else the name it was audited as), so both find one trail."""
    return AuditSettings.from_env().source(model_key, instance).name


def log_window_metrics(tracker: MlflowTracker, signals: WindowSignals, drift, run_tags: dict) -> str:
    """Every measurable signal of the window as MLflow metrics, step = window start (epoch seconds), in the
    model's one `live_monitoring` run (created once), so MLflow charts each signal across windows."""
    client = tracker.client()
    exp_id = tracker.experiment_id(signals.model_name)
    found = client.search_runs([exp_id], f"tags.stage = '{MLFLOW_RUN}'", max_results=1, order_by=["start_time ASC"])
    if found:
        run_id = found[0].info.run_id
    else:
        run_id = client.create_run(exp_id, run_name=MLFLOW_RUN, tags={"stage": MLFLOW_RUN}).info.run_id
        client.set_terminated(run_id, "FINISHED")  # a record, not a process: later windows still log to it
    step = int(signals.start.timestamp())
    values = {f"live/{k}": v for k, v in signals.metrics().items()}
    if drift.measurable:
        values |= {"drift/prompt_length_psi": drift.prompt_length_psi, "drift/word_unigram_jsd": drift.word_unigram_jsd}
    metrics = [Metric(k, float(v), step * 1000, step) for k, v in values.items()]
    for i in range(0, len(metrics), 900):
        client.log_batch(run_id, metrics=metrics[i : i + 900])
    for k, v in run_tags.items():
        client.set_tag(run_id, k, str(v))
    return f"{tracker.ui_url.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def canary_moves(store, model_name: str) -> list[dict]:
    """The model's canary trail entries (set, rolled back): what the dashboard lists beside the signals."""
    return [e for e in read_entries(store.trail_path(model_name)) if e.get("event") in (CANARY_SET, CANARY_ROLLED_BACK)]


def _markdown(signals: WindowSignals) -> str:
    rows = ["| arm | requests | error | timeout | validation failures | refusals | p95 s | fallback |",
            "|---|---:|---|---|---|---|---:|---|"]  # fmt: skip
    for arm in signals.arms.values():
        p95 = f"{arm.latency_s.p95:.3f}" if arm.latency_s.measurable else "not measurable"
        rates = (arm.error_rate, arm.timeout_rate, arm.validation_failure_rate, arm.refusal_rate)
        rows.append(f"| {arm.arm} | {arm.requests} | " + " | ".join(r.text() for r in rates) + f" | {p95} | "
                    f"{arm.fallback_rate.text()} |")  # fmt: skip
    return "\n".join(rows)


@dg.asset(group_name="monitoring", kinds={"mlflow", "html"}, partitions_def=LIVE)
def live_signals(
    context: dg.AssetExecutionContext, monitoring: MonitoringSettings, mlflow: MlflowTracker
) -> dg.MaterializeResult:
    """One hour of one model's served traffic, read from its request log: per-arm rates with Wilson 95%
    intervals (errors, timeouts, validation failures, refusals, fallbacks), latency quantiles, tokens, shadow
    agreement, and prompt drift against the golden prompts; stored per window, logged to MLflow (step = window
    start), and drawn into the model's HTML dashboard."""
    model_key, window = window_of(context.partition_key)
    model_name, store = model_name_of(model_key, context.instance), monitoring.store
    log = read_log(store, model_name)
    entries = log.window(window.start, window.end)
    signals = window_signals(model_name, entries, window.start, window.end)
    drift = detect_drift([e.prompt for e in entries])
    save_window(store, WindowRecord(signals=signals, drift=drift))
    url = log_window_metrics(mlflow, signals, drift, {"last_window": window.start.isoformat(),
                                                       "dagster_run_id": context.run.run_id})  # fmt: skip
    dashboard, png = write_dashboard(store, model_name, canary_moves(store, model_name))
    return dg.MaterializeResult(
        metadata={
            "model_name": model_name,
            "window": f"{window.start.isoformat()} – {window.end.isoformat()}",
            "requests": signals.requests,
            "unreadable_log_lines": log.unreadable,
            "signals": dg.MetadataValue.md(_markdown(signals)),
            "signals_json": dg.MetadataValue.json(signals.model_dump(mode="json", exclude=LATENCY_SAMPLES)),
            "drift": drift.why,
            "drifted": "not measurable" if drift.drifted is None else str(drift.drifted).lower(),
            "dashboard": dg.MetadataValue.path(str(dashboard)),
            "dashboard_url": dg.MetadataValue.url(dashboard.resolve().as_uri()),
            "plot": dg.MetadataValue.md(png_markdown(png)),
            "mlflow_run": dg.MetadataValue.url(url),
        }
    )


@dg.asset_check(
    asset=live_signals,
    partitions_def=LIVE,
    blocking=True,
    description="The canary is within the rollback policy on this window's traffic; when it is not, the canary "
    "alias has been moved back to production's version (or removed) and the trail records why.",
)
def canary_within_rollback_policy(
    context: dg.AssetCheckExecutionContext, monitoring: MonitoringSettings, mlflow: MlflowTracker
) -> dg.AssetCheckResult:
    """Blocking, so a run that materializes a window fails when its canary had to be taken off: the failure is
    the alert, and the rollback has already happened (the alias moved, the trail says why). An unusable policy
    file fails the check in one line, as a misconfiguration must not pass for a healthy canary."""
    model_key, window = window_of(context.partition_key)
    model_name, store = model_name_of(model_key, context.instance), monitoring.store
    policy_path = Path(monitoring.rollback_policy_file)
    policy = load_rollback_policy(policy_path)
    version = mlflow.alias_version(model_name, CANARY_ALIAS)
    if version is None:
        return dg.AssetCheckResult(passed=True, metadata={"canary": "none set: nothing to hold to the policy"})
    # only the evidence about the version that is the canary now: an old window must not roll back a new canary
    entries = about_version(read_log(store, model_name).window(window.start, window.end), policy.canary_arm, version)
    decision = evaluate(window_signals(model_name, entries, window.start, window.end), policy)
    metadata = {
        "decision": decision.summary,
        # the file's hash, so a reviewer sees which thresholds judged this window (the path alone can be re-pointed)
        "policy": f"{policy.name} ({monitoring.rollback_policy_file}, sha256 {sha256_file(policy_path)[:12]})",
        "canary_version": str(version),
        "enough_evidence": decision.enough_evidence,
        "canary_requests": decision.canary_requests,
        "canary_shadowed": decision.canary_shadowed,
        "baseline_requests": decision.baseline_requests,
        "criteria": dg.MetadataValue.json([c.model_dump(mode="json") for c in decision.criteria]),
    }
    if not decision.trip:
        return dg.AssetCheckResult(passed=True, metadata=metadata)
    entry = roll_back_canary(store, mlflow, model_name, decision, context.run.run_id)
    moved = entry["alias_moved"] if entry else "the canary alias was already gone"
    write_dashboard(store, model_name, canary_moves(store, model_name))  # the page shows the rollback now
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        description=decision.summary[:2000],
        metadata={**metadata, "rolled_back": moved, "trail_seq": entry["seq"] if entry else -1},
    )


live_monitoring_job = dg.define_asset_job(
    "live_monitoring", selection=[live_signals],
    description="One model's signals over one hour of traffic, and the canary held to the rollback policy.",
)  # fmt: skip


def _models_with_traffic(instance: dg.DagsterInstance, store) -> tuple[dict[str, tuple[str, int]], list[str]]:
    """Model key -> (model name, logged requests) for every model partition with a request log; notes on others."""
    found, notes = {}, []
    for model in instance.get_dynamic_partitions(MODELS.name):
        try:
            name = model_name_of(model, instance)
        except AuditInputError as e:
            notes.append(f"{model}: unusable ({e})")
            continue
        count = count_requests(store, name)
        if count:
            found[model] = (name, count)
        else:
            notes.append(f"{name}: nothing served yet")
    return found, notes


@dg.schedule(
    job=live_monitoring_job,
    cron_schedule=os.environ.get("QP_MONITOR_CRON", "5 * * * *"),
    default_status=dg.DefaultScheduleStatus.RUNNING if MONITORING_ON else dg.DefaultScheduleStatus.STOPPED,
    description="Every hour (QP_MONITOR_CRON; QP_MONITORING=off), each served model's hour just ended.",
)
def hourly_monitoring_schedule(context: dg.ScheduleEvaluationContext, monitoring: MonitoringSettings):
    tick = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
    start = tick.astimezone(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
    served, notes = _models_with_traffic(context.instance, monitoring.store)
    if not served:
        return dg.SkipReason("; ".join(notes) or "no model registered yet")
    return [
        dg.RunRequest(
            run_key=f"hourly:{model}:{start.isoformat()}",
            partition_key=live_key(model, start),
            tags={TRIGGER_TAG: "monitoring schedule"},
        )
        for model in served
    ]


@dg.sensor(
    job=live_monitoring_job,
    minimum_interval_seconds=INTERVAL,
    default_status=dg.DefaultSensorStatus.RUNNING if MONITORING_ON else dg.DefaultSensorStatus.STOPPED,
    description=f"After every {EVERY_N_REQUESTS} new requests of a model (QP_MONITOR_EVERY_N_REQUESTS; "
    "QP_MONITORING=off): its current hour, early.",
)
def request_volume_sensor(context: dg.SensorEvaluationContext, monitoring: MonitoringSettings):
    """The cursor is each model's logged-request count at its last request: a restart loses nothing, and a
    count seen twice requests one run (the run key repeats). A log that shrank (rotated) starts over."""
    cursor = json.loads(context.cursor) if context.cursor else {}
    served, notes = _models_with_traffic(context.instance, monitoring.store)
    now, requests = dt.datetime.now(dt.UTC), []
    for model, (name, count) in served.items():
        seen = cursor.get(model, 0) if cursor.get(model, 0) <= count else 0
        if count - seen < EVERY_N_REQUESTS:
            notes.append(
                f"{name}: {count - seen} new requests since the last window run, fewer than {EVERY_N_REQUESTS}"
            )
            cursor[model] = seen
            continue
        cursor[model] = count
        requests.append(dg.RunRequest(run_key=f"volume:{model}:{count}", partition_key=live_key(model, now),
                                      tags={TRIGGER_TAG: f"{count - seen} new requests"}))  # fmt: skip
    return dg.SensorResult(
        run_requests=requests, skip_reason=None if requests else "; ".join(notes) or "no model registered yet",
        cursor=json.dumps(cursor),
    )  # fmt: skip
