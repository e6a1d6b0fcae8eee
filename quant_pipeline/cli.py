"""`quant-pipeline`: the headless entry point (what `make demo` runs).

`audit` materializes the whole asset graph in-process against the project's Dagster instance,
so headless runs show up in the Dagster UI exactly like runs launched from it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from quant_pipeline.errors import AuditInputError
from quant_pipeline.paths import project_home


def _instance():
    import dagster as dg

    home = Path(os.environ.setdefault("DAGSTER_HOME", str(project_home() / ".dagster_home")))
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists() and (project_home() / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((project_home() / "dagster.yaml").read_text())
    return dg.DagsterInstance.get()


def run_audit(settings_overrides: dict, approver: str = "", note: str = "", instance=None, tracker=None, selection=None, raise_on_error: bool = False, tags: dict | None = None):
    """Preflight, then materialize the audit assets (all, or a selection); returns the ExecuteInProcessResult."""
    import dagster as dg

    from quant_pipeline.definitions import AUDIT_ASSETS, AUDIT_CHECKS, build_resources
    from quant_pipeline.preflight import preflight

    resources = build_resources(**settings_overrides)
    if tracker is not None:
        resources["mlflow"] = tracker
    preflight(resources["settings"])
    return dg.materialize(
        [*AUDIT_ASSETS, *AUDIT_CHECKS],
        resources=resources,
        instance=instance or _instance(),
        run_config={"ops": {"approval": {"config": {"approver": approver, "note": note}}}} if selection is None or "approval" in selection else None,
        raise_on_error=raise_on_error,
        selection=selection,
        tags=tags or {"quant_pipeline/trigger": "cli"},
    )


def summarize(result) -> str:
    """A plain-text table of what each stage found, for the terminal."""
    lines = [f"{'stage':<24} {'seconds':>8} {'peak MB':>8}  result", "-" * 78]
    mats = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        mats[mat.asset_key.to_user_string()] = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    for stage, md in mats.items():
        found = {
            "base_checkpoint": lambda: f"{md.get('model')} {md.get('num_parameters'):,} params, hash {str(md.get('content_hash'))[:12]}",
            "calibration_set": lambda: f"{md.get('samples')} samples, hash {str(md.get('content_hash'))[:12]}",
            "runtime_environment": lambda: f"torch {md.get('lib/torch')}, {md.get('cpu')}"[:60],
            "quantized_artifact": lambda: f"{md.get('artifact_id')} {md.get('size_mb')} MB ({md.get('size_vs_base')} of base)",
            "base_eval_results": lambda: f"{md.get('rows')} metrics, {md.get('eval_tokens_per_second')} tok/s",
            "quantized_eval_results": lambda: f"{md.get('rows')} metrics, {md.get('eval_tokens_per_second')} tok/s",
            "delta_report": lambda: f"{'PASS' if md.get('passed') else 'FAIL'}: {md.get('slices') - md.get('slices_failed')}/{md.get('slices')} slices within tolerance",
            "approval": lambda: f"{md.get('decision')} ({md.get('registry')})",
        }.get(stage, lambda: "")()
        lines.append(f"{stage:<24} {md.get('wall_seconds', ''):>8} {md.get('peak_rss_mb', ''):>8}  {found}")
    for check in result.get_asset_check_evaluations():
        lines.append(f"check {check.check_name:<30} {'passed' if check.passed else 'FAILED'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quant-pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    audit = sub.add_parser("audit", help="run the full audit (base checkpoint -> approval)")
    audit.add_argument("--model", help="'default', a local HF checkpoint dir, a .gguf file or a hub id")
    audit.add_argument("--calibration-file")
    audit.add_argument("--policy-file")
    audit.add_argument("--calibration-samples", type=int)
    audit.add_argument("--group-size", type=int)
    audit.add_argument("--bits", type=int)
    audit.add_argument("--eval-limit", type=int, help="items per eval task (for quick runs)")
    audit.add_argument("--approver", default="", help="name of the human signing off (omit: pending sign-off)")
    audit.add_argument("--note", default="")
    args = parser.parse_args(argv)

    if args.command == "audit":
        from quant_pipeline.settings import AuditSettings, Recipe

        overrides: dict = {k: v for k, v in {"model": args.model, "calibration_file": args.calibration_file, "policy_file": args.policy_file, "eval_limit": args.eval_limit}.items() if v is not None}
        recipe = {k: v for k, v in {"calibration_samples": args.calibration_samples, "group_size": args.group_size, "bits": args.bits}.items() if v is not None}
        if recipe:
            overrides["recipe"] = Recipe(**{**AuditSettings.from_env().recipe.model_dump(), **recipe})
        try:
            result = run_audit(overrides, args.approver, args.note)
        except AuditInputError as e:
            print(f"quant-pipeline: error: {e}", file=sys.stderr)
            return 2
        print(summarize(result))
        print(f"\nDagster run {result.run_id}: `make ui` then http://127.0.0.1:3000/runs/{result.run_id}")
        print("MLflow runs and registry: `make mlflow` then http://127.0.0.1:5000")
        return 0 if result.success else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
