"""`quant-pipeline audit`: the whole asset graph, in-process, against the project's Dagster instance,
so headless runs show up in the Dagster UI exactly like runs launched from it."""

from __future__ import annotations

import os
from pathlib import Path

import dagster as dg

from quant_pipeline.core.paths import project_home
from quant_pipeline.definitions import AUDIT_ASSETS, AUDIT_CHECKS
from quant_pipeline.defs.preflight import preflight
from quant_pipeline.defs.resources import build_resources


def _instance():
    home = Path(os.environ.setdefault("DAGSTER_HOME", str(project_home() / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (project_home() / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((project_home() / "dagster.yaml").read_text())
    return dg.DagsterInstance.get()


def run_audit(
    settings_overrides: dict,
    approver: str = "",
    note: str = "",
    instance=None,
    tracker=None,
    selection=None,
    raise_on_error: bool = False,
    tags: dict | None = None,
):
    """Preflight, then materialize the audit assets (all, or a selection); returns the ExecuteInProcessResult."""
    resources = build_resources(**settings_overrides)
    if tracker is not None:
        resources["mlflow"] = tracker
    preflight(resources["settings"])
    return dg.materialize(
        [*AUDIT_ASSETS, *AUDIT_CHECKS],
        resources=resources,
        instance=instance or _instance(),
        run_config={"ops": {"approval": {"config": {"approver": approver, "note": note}}}}
        if selection is None or "approval" in selection
        else None,
        raise_on_error=raise_on_error,
        selection=selection,
        tags=tags or {"quant_pipeline/trigger": "cli"},
    )


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
        within = md.get("slices") - md.get("slices_failed")
        return f"{'PASS' if md.get('passed') else 'FAIL'}: {within}/{md.get('slices')} slices within tolerance"
    if stage == "approval":
        return f"{md.get('decision')} ({md.get('registry')})"
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
        lines.append(f"check {check.check_name:<30} {'passed' if check.passed else 'FAILED'}")
    return "\n".join(lines)
