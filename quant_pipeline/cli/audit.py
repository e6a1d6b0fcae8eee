"""`quant-pipeline audit`: the whole asset graph, in-process, against the project's Dagster instance,
so headless runs show up in the Dagster UI exactly like runs launched from it (one run per phase: the
model's stages, the candidate's, the comparison).

A run ends one of these ways, and the exit code says which (see `AuditOutcome`): the audit
completed with verdict PASS (0); it completed with verdict FAIL or INCOMPLETE (3: that is the
audit's answer, recorded in full — the gate's rejection, the audit report, the ML-BOM — not a
crash); bad input stopped a stage (2); or a stage crashed (1).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import dagster as dg

from quant_pipeline.core.errors import EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_GATE_FAILED, EXIT_PASSED, AuditInputError
from quant_pipeline.core.paths import project_home
from quant_pipeline.core.perf import freeze_import_heap
from quant_pipeline.definitions import AUDIT_ASSETS, AUDIT_CHECKS
from quant_pipeline.defs.candidates import PHASE_JOBS, AuditRuns, phases, register, run_phases
from quant_pipeline.defs.preflight import preflight
from quant_pipeline.defs.resources import build_resources

GATED_ASSET = "delta_report"


def _input_error_names() -> frozenset[str]:
    """AuditInputError and every subclass (a policy that is not the pinned one, a tampered record, ...):
    the refusals a stage raises for input a person can fix. Dagster keeps only the class name of an
    error, so the names are what is matched."""
    names, todo = set(), [AuditInputError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo += cls.__subclasses__()
    return frozenset(names)


def _instance():
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(project_home() / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (project_home() / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((project_home() / "dagster.yaml").read_text())
    return dg.DagsterInstance.get()


class _KnownFailureFormatter(logging.Formatter):
    """Dagster's console format, minus the framework stack trace when a stage refused bad input.

    A refusal the message already explains (a policy that is not the pinned one, a tampered file) is
    an answer, not a bug: a traceback there reads as "the pipeline broke" and buries the one line
    that says what to fix. Every other failure keeps its stack trace.
    """

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self._inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        text = self._inner.format(record)
        known = any(f"{name}:" in text for name in _input_error_names())
        return text.split("\nStack Trace:", 1)[0].rstrip() if known else text


def _console_logger(init_context) -> logging.Logger:
    log = dg.colored_console_logger.logger_fn(init_context)
    for handler in log.handlers:
        handler.setFormatter(_KnownFailureFormatter(handler.formatter))
    return log


AUDIT_CONSOLE = dg.LoggerDefinition(
    _console_logger,
    config_schema=dg.colored_console_logger.config_schema,
    description="Dagster's colored console logger; a refused bad input is logged without a stack trace.",
)


# Loggers of libraries that warn about themselves, not about the audit: lm-eval per task, torchao about CUDA
# kernels a CPU machine cannot load, torch's pytree about torchao's enums, MLflow's table set-up.
NOISY_LOGGERS = (
    "lm_eval", "lm-eval", "optimum", "logbar", "mlflow", "transformers", "datasets", "urllib3", "torchao",
    "torch.utils._pytree",
)  # fmt: skip


def _quiet_loggers() -> None:
    """The noisy loggers to ERROR, before the pre-run check: it imports torchao and HQQ (through transformers),
    which is when they speak."""
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _quiet_libraries() -> None:
    """Library chatter off the terminal: lm-eval's per-task warnings, optimum's and gptqmodel's (logbar)
    per-layer INFO lines, MLflow's table set-up, Hugging Face weight-loading bars, gptqmodel's import banner,
    transformers' FutureWarnings. Progress that says how far a long stage is (our bars and run-log lines,
    which stand in for lm-eval's request bar; optimum's GPTQ block bar) stays. The loggers among them are
    already quiet: `_quiet_loggers` runs before the pre-run check."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import transformers

    transformers.utils.logging.disable_progress_bar()
    # its own verbosity too: transformers sets its root logger's level when it first logs, over `_quiet_loggers`
    # (a tiny model's config said "`loss_type=None` was set in the config but it is unrecognized" on the terminal)
    transformers.utils.logging.set_verbosity_error()
    with contextlib.redirect_stdout(io.StringIO()):  # gptqmodel prints a banner and its env settings on import
        import gptqmodel  # noqa: F401
    from logbar import LogBar  # gptqmodel's logger: kernel selection and packing INFO lines per model load

    LogBar.shared().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices


def run_audit(
    settings_overrides: dict,
    approver: str = "",
    note: str = "",
    instance=None,
    tracker=None,
    selection=None,
    raise_on_error: bool = False,
    tags: dict | None = None,
    verbose: bool = False,
) -> AuditRuns:
    """Preflight, then materialize the audit assets (all, or a selection) of the settings' model and candidate,
    in the runs they take (`defs.candidates.phases`: the model's stages, the candidate's, the comparison).

    Each run is built like `dg.materialize` (an asset job over the audit graph), but with the console logger
    above and named after its phase."""
    resources = build_resources(**settings_overrides)
    if tracker is not None:
        resources["mlflow"] = tracker
    settings = resources["settings"]
    if not verbose:
        _quiet_loggers()
    preflight(settings, settings.recipe)
    if not verbose:
        _quiet_libraries()  # before the stack's import below: gptqmodel's banner is caught on its first import
    freeze_import_heap()  # after the pre-run check: bad input is refused without importing the stack
    instance = instance or _instance()
    # A job's own logger runs only when the run config names it; the level is what Dagster's default uses.
    # Dagster's DEBUG engine events and lm-eval's per-task warnings bury the progress lines and the
    # verdict; they stay in the run's event log (the UI) and come back to the terminal with --verbose.
    level = "DEBUG" if verbose else (instance.python_log_level or "INFO")

    def execute(phase: str, stages: list[str], partition_key):
        defs = dg.Definitions(
            jobs=[dg.define_asset_job(name=PHASE_JOBS[phase].name, selection=stages)],
            assets=[*AUDIT_ASSETS, *AUDIT_CHECKS],
            resources=resources,
            loggers={"console": AUDIT_CONSOLE},
        )
        run_config: dict = {"loggers": {"console": {"config": {"log_level": level}}}}
        if "approval" in stages:
            run_config["ops"] = {"approval": {"config": {"approver": approver, "note": note}}}
        return defs.resolve_job_def(PHASE_JOBS[phase].name).execute_in_process(
            instance=instance,
            run_config=run_config,
            raise_on_error=raise_on_error,
            tags=tags or {"quant_pipeline/trigger": "cli"},
            partition_key=partition_key,
        )

    candidate = any(phase == "candidate" for phase, _ in phases(selection))
    model = register(instance, settings.model, settings.recipe if candidate else None)
    return run_phases(execute, selection, model, settings.recipe)


@dataclass(frozen=True)
class AuditOutcome:
    """How a run ended: the exit code, the verdict line for stdout, and (not PASS/FAIL) one line for stderr."""

    code: int
    verdict: str
    error: str = ""


def _innermost(error):
    """The exception a stage raised: Dagster wraps it (DagsterExecutionStepExecutionError -> cause)."""
    while error.cause is not None:
        error = error.cause
    return error


def _error_text(error) -> str:
    first = (error.message.strip().splitlines() or [""])[0]
    return first.split(f"{error.cls_name}: ", 1)[-1] if error.cls_name else first


def _failures(result) -> list[tuple[str, object]]:
    """(stage, SerializableErrorInfo or None) of each failed step, or of the run if it failed before any step."""
    steps = [(e.step_key, e.step_failure_data.error) for e in result.all_events if e.is_step_failure]
    if steps or result.success:
        return steps
    run = next((e for e in result.all_events if e.event_type == dg.DagsterEventType.RUN_FAILURE), None)
    return [("run start", getattr(run.event_specific_data, "error", None) if run else None)]


def _materialized(result, asset: str) -> dict | None:
    """The metadata of ``asset``'s materialization in this run (None if it was not materialized)."""
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        if mat.asset_key.to_user_string() == asset:
            return {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    return None


def audit_outcome(result) -> AuditOutcome:
    """Classify a finished run: PASS (0), FAIL or INCOMPLETE verdict (3), bad input (2), crash (1)."""
    crashes = _failures(result)
    if crashes:
        stage, error = crashes[0]
        inner = _innermost(error) if error is not None else None
        if inner is not None and inner.cls_name in _input_error_names():
            return AuditOutcome(EXIT_BAD_INPUT, f"verdict: none — bad input stopped {stage}", _error_text(inner))
        what = f" ({inner.cls_name}: {_error_text(inner)[:200]})" if inner is not None else ""
        return AuditOutcome(
            EXIT_CRASHED,
            f"verdict: none — the audit did not complete: stage {stage} failed",
            f"stage {stage} failed{what}; the traceback is in Dagster run {result.run_id} "
            f"(`make ui`, then http://127.0.0.1:3000/runs/{result.run_id})",
        )
    report = _materialized(result, GATED_ASSET)
    if report is None:
        return AuditOutcome(EXIT_PASSED, f"verdict: none — {GATED_ASSET} was not part of this run")
    verdict = report.get("verdict") or "INCOMPLETE"
    slices = report.get("slices", 0)
    found = (
        f"{slices - report.get('slices_failed', 0) - report.get('slices_incomplete', 0)}/{slices} gated slices "
        f"within tolerance or waived, {report.get('slices_failed', 0)} regressed, "
        f"{report.get('slices_incomplete', 0)} could not show a regression"
    )
    decision = (_materialized(result, "approval") or {}).get("decision")
    line = f"verdict: {verdict} — {found}" + (f"; decision: {decision}" if decision else "")
    line += f"\nreport: {report.get('html_report')}"
    if report.get("approval_revoked") not in (None, "", "no"):
        line = f"approval REVOKED: {report['approval_revoked']}\n{line}"
    return AuditOutcome(EXIT_PASSED if verdict == "PASS" else EXIT_GATE_FAILED, line)


def _parts(md: dict) -> str:
    """Seconds per part of an eval stage (harness, behaviour, bias, latency, reference/agreement)."""
    parts = md.get("part_seconds") or {}
    return (
        " ".join(f"{k.removesuffix('_seconds')} {v:.0f}s" for k, v in parts.items())
        or f"reused from {md.get('reused_from_run')}"
    )


def stage_finding(stage: str, md: dict) -> str:
    """One stage's headline for the terminal, from its materialization metadata."""
    if stage == "base_checkpoint":
        return f"{md.get('model')} {md.get('num_parameters'):,} params, hash {str(md.get('content_hash'))[:12]}"
    if stage == "calibration_set":
        return f"{md.get('samples')} samples, hash {str(md.get('content_hash'))[:12]}"
    if stage == "runtime_environment":
        return f"torch {md.get('lib/torch')}, {md.get('cpu')}"[:60]
    if stage == "quantized_artifact":
        return f"{md.get('artifact_id')} {md.get('size_mb')} MB ({md.get('size_vs_base')} of base)"
    if stage in ("base_eval_results", "quantized_eval_results"):
        return f"{md.get('rows')} metrics, {md.get('eval_tokens_per_second')} tok/s; {_parts(md)}"
    if stage == "delta_report":
        return (
            f"{md.get('verdict')}: {md.get('slices_failed')} regressed, {md.get('slices_incomplete')} incomplete, "
            f"{md.get('slices_waived')} waived of {md.get('slices')} gated slices"
        )
    if stage == "approval":
        return f"{md.get('decision')} ({md.get('registry')})"
    if stage == "candidate_tradeoff":
        return f"{md.get('candidates')} candidate(s) compared; recommended: {md.get('recommended_artifact')}"
    if stage == "audit_report":
        return f"report {md.get('html')}, ML-BOM {md.get('mlbom')}"
    return ""


def summarize(result) -> str:
    """A plain-text table of what each stage found, for the terminal."""
    lines = [f"{'stage':<24} {'seconds':>8} {'peak MB':>8}  result", "-" * 78]
    mats = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        mats[mat.asset_key.to_user_string()] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    for stage, md in mats.items():
        found = stage_finding(stage, md)
        lines.append(f"{stage:<24} {md.get('wall_seconds', ''):>8} {md.get('peak_rss_mb', ''):>8}  {found}")
    for check in result.get_asset_check_evaluations():
        status = "passed" if check.passed else "FAILED"
        if not check.passed and check.severity == dg.AssetCheckSeverity.WARN:  # a warning, not a finding
            status = f"WARNING: {check.description}" if check.description else "WARNING"
        lines.append(f"check {check.check_name:<30} {status}")
    return "\n".join(lines)
