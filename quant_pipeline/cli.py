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


def _parts(md: dict) -> str:
    """Seconds per part of an eval stage (harness, behaviour, bias, latency, reference/agreement)."""
    parts = md.get("part_seconds") or {}
    return " ".join(f"{k.removesuffix('_seconds')} {v:.0f}s" for k, v in parts.items()) or f"reused from {md.get('reused_from_run')}"


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
            "base_eval_results": lambda: f"{md.get('rows')} metrics, {md.get('eval_tokens_per_second')} tok/s; {_parts(md)}",
            "quantized_eval_results": lambda: f"{md.get('rows')} metrics, {md.get('eval_tokens_per_second')} tok/s; {_parts(md)}",
            "delta_report": lambda: f"{'PASS' if md.get('passed') else 'FAIL'}: {md.get('slices') - md.get('slices_failed')}/{md.get('slices')} slices within tolerance",
            "approval": lambda: f"{md.get('decision')} ({md.get('registry')})",
            "audit_report": lambda: f"report {md.get('html')}, ML-BOM {md.get('mlbom')}",
        }.get(stage, lambda: "")()
        lines.append(f"{stage:<24} {md.get('wall_seconds', ''):>8} {md.get('peak_rss_mb', ''):>8}  {found}")
    for check in result.get_asset_check_evaluations():
        lines.append(f"check {check.check_name:<30} {'passed' if check.passed else 'FAILED'}")
    return "\n".join(lines)


def _store_and_tracker():
    from quant_pipeline.definitions import build_resources

    resources = build_resources()
    return resources["settings"].store, resources["mlflow"]


def add_registry_commands(sub) -> None:
    """Registry, sign-off and audit-trail commands (read the store and MLflow the pipeline writes)."""
    import json

    from quant_pipeline import audit_report, registry, signoff
    from quant_pipeline.trail import verify_trail

    def show(a):
        store, tracker = _store_and_tracker()
        print(json.dumps(registry.show(store, tracker, a.artifact_id), indent=2, default=str))
        return 0

    def verify(a):
        store, _ = _store_and_tracker()
        problems = registry.verify(store, a.artifact_id)
        print(f"{a.artifact_id}: " + ("files match the record" if not problems else "MISMATCH: " + "; ".join(problems)))
        return 0 if not problems else 1

    def approve(a):
        store, tracker = _store_and_tracker()
        entry = signoff.approve(store, tracker, a.artifact_id, a.by, a.note, a.second_approver, a.override)
        print(f"{a.artifact_id}: approved by {entry['by']}{' (override, with ' + entry['second_approver'] + ')' if entry['override'] else ''}; alias `approved` -> v{entry['registry_version']}")
        return 0

    def reject(a):
        store, tracker = _store_and_tracker()
        signoff.reject(store, tracker, a.artifact_id, a.by, a.note)
        print(f"{a.artifact_id}: rejected by {a.by}")
        return 0

    def promote(a):
        store, tracker = _store_and_tracker()
        entry = signoff.promote(store, tracker, a.artifact_id, a.by, a.note)
        print(f"production -> v{entry['registry_version']} ({a.artifact_id})")
        return 0

    def rollback(a):
        store, tracker = _store_and_tracker()
        entry = signoff.rollback(store, tracker, a.model, a.by, a.note, to_base=a.to_base)
        print(f"production: v{entry['from_version']} -> v{entry['registry_version']} ({entry['artifact_id']}){' [base model]' if entry['to_base'] else ''}")
        return 0

    def check_trail(a):
        store, _ = _store_and_tracker()
        problems = verify_trail(signoff.trail_path(store, a.model), a.expected_head)
        print(f"{a.model}: trail " + ("intact" if not problems else "BROKEN:\n  " + "\n  ".join(problems)))
        return 0 if not problems else 1

    def report(a):
        store, tracker = _store_and_tracker()
        md, page = audit_report.write_report(store, tracker, a.model)
        print(f"wrote {md}\nwrote {page}")
        return 0

    def bom(a):
        store, _ = _store_and_tracker()
        print(f"wrote {registry.write_bom(store, a.artifact_id)} (validated against CycloneDX 1.6)")
        return 0

    def delete_base(a):
        store, _ = _store_and_tracker()
        registry.delete_base(store, Path(a.model) if Path(a.model).is_dir() else store / "checkpoints" / a.model)
        print(f"deleted base checkpoint {a.model}")
        return 0

    for name, func, help_text, args in (
        ("show", show, "print an artifact's full record", ["artifact_id"]),
        ("verify", verify, "re-hash an artifact's files against its record", ["artifact_id"]),
        ("approve", approve, "sign off an artifact whose checks passed", ["artifact_id", "--by", "--note", "--second-approver", "--override"]),
        ("reject", reject, "record a rejection with its reason", ["artifact_id", "--by", "--note"]),
        ("promote", promote, "move `production` to an approved artifact", ["artifact_id", "--by", "--note"]),
        ("rollback", rollback, "move `production` back (previous approved version, or --to-base)", ["model", "--by", "--note", "--to-base"]),
        ("verify-trail", check_trail, "check the model's hash-chained audit trail", ["model", "--expected-head"]),
        ("audit-report", report, "write the model's audit report (HTML + Markdown)", ["model"]),
        ("bom", bom, "write an artifact's CycloneDX 1.6 ML-BOM", ["artifact_id"]),
        ("delete-base", delete_base, "delete a kept base checkpoint (refused while artifacts depend on it)", ["model"]),
    ):
        p = sub.add_parser(name, help=help_text)
        for arg in args:
            if arg in ("--override", "--to-base"):
                p.add_argument(arg, action="store_true")
            elif arg.startswith("--"):
                p.add_argument(arg, default="" if arg != "--expected-head" else None, required=arg in ("--by",))
            else:
                p.add_argument(arg)
        p.set_defaults(func=func)


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
    add_registry_commands(sub)
    from quant_pipeline.serving import add_cli as add_serving_commands

    add_serving_commands(sub)
    args = parser.parse_args(argv)
    if hasattr(args, "func"):
        try:
            return args.func(args)
        except AuditInputError as e:
            print(f"quant-pipeline: error: {e}", file=sys.stderr)
            return 2

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
