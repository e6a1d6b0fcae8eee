"""Stage 6 — the delta report: quantized vs base, per slice and metric, against a tolerance policy.

Tolerances come from a YAML policy written before measuring (its hash is in the report), so a
result cannot be made to pass by choosing the bar afterwards. Deltas are per category because
quantization damage is uneven: one slice can collapse while the average holds.
"""


from pathlib import Path
from typing import Literal

import dagster as dg
import pandas as pd
import yaml
from pydantic import BaseModel, ValidationError

from quant_pipeline.errors import AuditInputError
from quant_pipeline.settings import AuditSettings
from quant_pipeline.storage import sha256_file, write_json_atomic
from quant_pipeline.tracking import MlflowTracker

KNOWN_METRICS = ("acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte")


class Tolerance(BaseModel, extra="forbid"):
    direction: Literal["higher_is_better", "lower_is_better"]
    mode: Literal["absolute", "relative"] = "absolute"
    tolerance: float
    per_category: dict[str, float] = {}

    def for_category(self, category: str) -> float:
        return self.per_category.get(category, self.tolerance)


class Policy(BaseModel, extra="forbid"):
    name: str
    tolerances: dict[str, Tolerance]


def load_policy(path: Path) -> tuple[Policy, str]:
    """Parse and validate a policy file; return it with its content hash."""
    if not path.is_file():
        raise AuditInputError(f"policy file {path} does not exist: set settings.policy_file (QP_POLICY_FILE)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise AuditInputError(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise AuditInputError(f"{path}: expected a mapping with `name` and `tolerances`")
    for metric in (raw.get("tolerances") or {}):
        if metric not in KNOWN_METRICS:
            raise AuditInputError(f"{path}: tolerances.{metric}: unknown metric '{metric}'; known metrics: {', '.join(KNOWN_METRICS)}")
    try:
        policy = Policy.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(str(p) for p in err["loc"])
        raise AuditInputError(f"{path}: field `{field}`: {err['msg']}") from None
    if not policy.tolerances:
        raise AuditInputError(f"{path}: `tolerances` is empty: give at least one metric")
    return policy, sha256_file(path)


def compute_deltas(base: pd.DataFrame, quantized: pd.DataFrame, policy: Policy) -> pd.DataFrame:
    """One row per (category, metric) in the policy: values, deltas, tolerance, pass/fail."""
    b = base.set_index(["category", "metric"])["value"]
    q = quantized.set_index(["category", "metric"])["value"]
    rows = []
    for (category, metric), base_value in b.items():
        if metric not in policy.tolerances:
            continue
        tol = policy.tolerances[metric]
        quant_value = q.get((category, metric), float("nan"))
        delta = quant_value - base_value
        degradation = -delta if tol.direction == "higher_is_better" else delta
        rel = degradation / abs(base_value) if base_value else (float("inf") if degradation > 0 else 0.0)
        allowed = tol.for_category(category)
        measured = degradation if tol.mode == "absolute" else rel
        rows.append({
            "category": category, "metric": metric, "base": base_value, "quantized": quant_value,
            "delta": delta, "rel_delta": delta / abs(base_value) if base_value else float("nan"),
            "degradation": measured, "tolerance": allowed, "mode": tol.mode,
            "passed": bool(measured <= allowed),  # NaN compares False: a missing measurement fails
        })
    return pd.DataFrame(rows)


def render_markdown(deltas: pd.DataFrame, policy: Policy, policy_hash: str, artifact_id: str) -> str:
    verdict = "PASS" if len(deltas) and deltas["passed"].all() else "FAIL"
    lines = [
        f"## Delta report — {artifact_id}: **{verdict}**",
        f"Policy `{policy.name}` (sha256 `{policy_hash[:16]}`), {int(deltas['passed'].sum())}/{len(deltas)} slices within tolerance.",
        "",
        "| category | metric | base | quantized | delta | degradation | tolerance | result |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in deltas.itertuples():
        unit = "" if r.mode == "absolute" else " (rel)"
        lines.append(f"| {r.category} | {r.metric} | {r.base:.4f} | {r.quantized:.4f} | {r.delta:+.4f} | {r.degradation:+.4f}{unit} | {r.tolerance:.4f}{unit} | {'pass' if r.passed else '**FAIL**'} |")
    return "\n".join(lines)


@dg.asset(group_name="audit", kinds={"pandas", "markdown"})
def delta_report(context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, quantized_artifact: dict, base_eval_results: dict, quantized_eval_results: dict) -> dg.MaterializeResult:
    """Per-slice quantized-vs-base deltas judged against the pre-committed tolerance policy."""
    policy_path = Path(settings.policy_file)
    policy, policy_hash = load_policy(policy_path)
    deltas = compute_deltas(pd.read_parquet(base_eval_results["results_path"]), pd.read_parquet(quantized_eval_results["results_path"]), policy)
    aid = quantized_artifact["artifact_id"]
    markdown = render_markdown(deltas, policy, policy_hash, aid)
    out_dir = settings.store / "reports" / aid
    out_dir.mkdir(parents=True, exist_ok=True)
    deltas.to_parquet(out_dir / "delta_report.parquet")
    (out_dir / "delta_report.md").write_text(markdown)
    passed = bool(len(deltas) and deltas["passed"].all())
    record = {
        "artifact_id": aid, "model_name": quantized_artifact["model_name"], "registry_version": quantized_artifact["registry_version"],
        "policy_path": str(policy_path.resolve()), "policy_hash": policy_hash, "policy_name": policy.name,
        "passed": passed, "failing": deltas.loc[~deltas["passed"], ["category", "metric"]].to_dict("records"),
        "measured_metrics": sorted(deltas["metric"].unique()) if len(deltas) else [], "policy_metrics": sorted(policy.tolerances),
        "categories": sorted(deltas["category"].unique()) if len(deltas) else [],
        "path": str(out_dir / "delta_report.parquet"), "markdown_path": str(out_dir / "delta_report.md"),
    }
    write_json_atomic(out_dir / "delta_report.json", record)
    with mlflow.stage_run(record["model_name"], "delta_report", {"dagster_run_id": context.run.run_id, "artifact_id": aid, "policy_hash": policy_hash}) as run:
        run.log_params({"policy_name": policy.name, "policy_hash": policy_hash, "passed": passed})
        run.log_metrics({f"delta/{r.metric}/{r.category}": r.delta for r in deltas.itertuples()} | {"slices_failed": int((~deltas["passed"]).sum())})
        for name in ("delta_report.md", "delta_report.parquet", "delta_report.json"):
            run.log_file(out_dir / name)
        run.log_file(policy_path, "policy")
    mlflow.set_version_tags(record["model_name"], quantized_artifact["registry_version"], {"delta_passed": passed, "policy_hash": policy_hash})
    return dg.MaterializeResult(
        value=record,
        metadata={
            "report": dg.MetadataValue.md(markdown),
            "passed": passed,
            "slices": len(deltas),
            "slices_failed": int((~deltas["passed"]).sum()) if len(deltas) else 0,
            "policy_hash": policy_hash,
            **run.metadata(),
        },
    )


@dg.asset_check(asset=delta_report, blocking=True, description="Every slice's degradation is within the policy's tolerance.")
def slices_within_tolerance(delta_report: dict) -> dg.AssetCheckResult:
    failing = delta_report["failing"]
    return dg.AssetCheckResult(
        passed=delta_report["passed"],
        metadata={"failing_slices": ", ".join(f"{f['metric']}/{f['category']}" for f in failing) or "none"},
    )


@dg.asset_check(asset=delta_report, blocking=True, description="Every metric the policy names was measured on both models (no silent gaps).")
def policy_metrics_measured(delta_report: dict) -> dg.AssetCheckResult:
    missing = sorted(set(delta_report["policy_metrics"]) - set(delta_report["measured_metrics"]))
    return dg.AssetCheckResult(passed=not missing, metadata={"missing_metrics": ", ".join(missing) or "none"})
