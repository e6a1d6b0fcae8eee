"""Stage 6 — the delta report: quantized vs base, per slice and metric, against a tolerance policy.

Tolerances come from a YAML policy written before measuring (its hash is in the report), so a
result cannot be made to pass by choosing the bar afterwards. Deltas are per slice because
quantization damage is uneven: one slice can collapse while the average holds. Each delta carries
a paired bootstrap 95% interval over the same items, and a slice with too few items is reported
as not measurable rather than silently passed or failed.
"""

import base64
import html
import io
from pathlib import Path
from typing import Literal

import dagster as dg
import numpy as np
import pandas as pd
import yaml
from pydantic import BaseModel, ValidationError

from quant_pipeline.behaviour import paired_bootstrap_ci
from quant_pipeline.errors import AuditInputError
from quant_pipeline.settings import AuditSettings
from quant_pipeline.signoff import record_event
from quant_pipeline.storage import sha256_file, write_json_atomic
from quant_pipeline.tracking import MlflowTracker

# What a metric means when it is the quantized model's agreement with the base: the base agrees
# with itself perfectly, so its reference value is fixed.
REFERENCE_VALUES = {"top1_agreement": 1.0, "kl_divergence": 0.0, "exact_match": 1.0, "prefix_agreement": 1.0}
KNOWN_METRICS = (
    "acc", "acc_norm", "word_perplexity", "byte_perplexity", "bits_per_byte",
    "top1_agreement", "kl_divergence", "exact_match", "prefix_agreement",
    "format_validity", "tool_call_validity", "refusal_rate", "over_refusal_rate",
    "toxicity_rate", "pii_rate", "repetition_rate", "degeneration_rate", "bias_gap",
    "latency_p50_s", "latency_p95_s", "latency_p99_s", "tokens_per_second", "load_peak_rss_mb", "generation_peak_rss_mb",
)  # fmt: skip
REGRESSION, WITHIN, NOT_MEASURABLE, UNGATED = "regression beyond tolerance", "within tolerance", "not measurable (too few items)", "reported (no tolerance)"


class Tolerance(BaseModel, extra="forbid"):
    direction: Literal["higher_is_better", "lower_is_better"]
    mode: Literal["absolute", "relative"] = "absolute"
    tolerance: float
    per_category: dict[str, float] = {}
    min_items: int | None = None

    def for_category(self, category: str) -> float:
        return self.per_category.get(category, self.tolerance)


class Policy(BaseModel, extra="forbid"):
    name: str
    min_items: int = 20
    allow_override: bool = False  # may two named people approve an artifact that failed its checks?
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
    for metric in raw.get("tolerances") or {}:
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


def paired_items(base_items: pd.DataFrame | None, quant_items: pd.DataFrame | None, category: str, metric: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-item values of one metric for the same items on both models (the base's fixed for agreement)."""
    if quant_items is None or metric not in quant_items.columns:
        return None
    q = quant_items[(quant_items["category"] == category)].set_index("item_id")[metric].dropna()
    if metric in REFERENCE_VALUES:
        return np.full(len(q), REFERENCE_VALUES[metric]), q.to_numpy(dtype=float)
    if base_items is None or metric not in base_items.columns:
        return None
    b = base_items[(base_items["category"] == category)].set_index("item_id")[metric].dropna()
    common = b.index.intersection(q.index)
    return b.loc[common].to_numpy(dtype=float), q.loc[common].to_numpy(dtype=float)


def compute_deltas(base: pd.DataFrame, quantized: pd.DataFrame, policy: Policy, base_items: pd.DataFrame | None = None, quant_items: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (slice, metric): values, delta with paired 95% CI, tolerance and status."""
    b = base.drop_duplicates(["category", "metric"], keep="last").set_index(["category", "metric"])["value"]
    q = quantized.drop_duplicates(["category", "metric"], keep="last").set_index(["category", "metric"])["value"]
    keys = list(dict.fromkeys([*b.index, *[k for k in q.index if k[1] in REFERENCE_VALUES]]))
    rows = []
    for category, metric in keys:
        base_value = REFERENCE_VALUES.get(metric, b.get((category, metric), float("nan")))
        quant_value = q.get((category, metric), float("nan"))
        delta = quant_value - base_value
        pairs = paired_items(base_items, quant_items, category, metric)
        n_items = len(pairs[0]) if pairs is not None else None
        ci_low, ci_high = paired_bootstrap_ci(*pairs)[1:] if pairs is not None and n_items else (float("nan"), float("nan"))
        row = {
            "category": category, "metric": metric, "base": base_value, "quantized": quant_value, "delta": delta,
            "rel_delta": delta / abs(base_value) if base_value else float("nan"), "ci_low": ci_low, "ci_high": ci_high,
            "n_items": n_items, "significant": bool(ci_low > 0 or ci_high < 0) if n_items else False,
            "degradation": float("nan"), "tolerance": float("nan"), "mode": "", "status": UNGATED, "passed": True,
        }  # fmt: skip
        tol = policy.tolerances.get(metric)
        if tol is not None:
            degradation = -delta if tol.direction == "higher_is_better" else delta
            rel = degradation / abs(base_value) if base_value else (float("inf") if degradation > 0 else 0.0)
            measured = degradation if tol.mode == "absolute" else rel
            min_items = tol.min_items if tol.min_items is not None else policy.min_items
            if n_items is not None and n_items < min_items:
                status = NOT_MEASURABLE
            else:
                status = WITHIN if measured <= tol.for_category(category) else REGRESSION  # NaN: regression
            row.update(degradation=measured, tolerance=tol.for_category(category), mode=tol.mode, status=status, passed=status != REGRESSION)
        rows.append(row)
    return pd.DataFrame(rows)


def _fmt(x) -> str:
    return "–" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{x:.4f}"


def render_markdown(deltas: pd.DataFrame, policy: Policy, policy_hash: str, artifact_id: str) -> str:
    gated = deltas[deltas["status"] != UNGATED]
    verdict = "PASS" if len(gated) and gated["passed"].all() else "FAIL"
    counts = gated["status"].value_counts().to_dict()
    lines = [
        f"## Delta report — {artifact_id}: **{verdict}**",
        f"Policy `{policy.name}` (sha256 `{policy_hash[:16]}`): {counts.get(REGRESSION, 0)} regression(s) beyond tolerance, "
        f"{counts.get(WITHIN, 0)} within tolerance, {counts.get(NOT_MEASURABLE, 0)} not measurable (< {policy.min_items} items).",
        "",
    ]
    for status in (REGRESSION, WITHIN, NOT_MEASURABLE, UNGATED):
        part = deltas[deltas["status"] == status]
        if not len(part):
            continue
        lines += [f"### {status.capitalize()} ({len(part)})", "", "| slice | metric | n | base | quantized | delta [95% CI] | tolerance |", "|---|---|---:|---:|---:|---|---:|"]
        for r in part.itertuples():
            ci = f" [{_fmt(r.ci_low)}, {_fmt(r.ci_high)}]" if r.n_items else ""
            tol = f"{_fmt(r.tolerance)}{' rel' if r.mode == 'relative' else ''}" if r.mode else "–"
            lines.append(f"| {r.category} | {r.metric} | {r.n_items if r.n_items else '–'} | {_fmt(r.base)} | {_fmt(r.quantized)} | {r.delta:+.4f}{ci}{' *' if r.significant else ''} | {tol} |")
        lines.append("")
    lines.append("`*` the 95% paired bootstrap interval excludes zero.")
    return "\n".join(lines)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def render_html(deltas: pd.DataFrame, markdown: str, base_results: pd.DataFrame, quant_results: pd.DataFrame, sizes: dict) -> str:
    """A self-contained HTML report: the tables, per-slice deltas with intervals, and cost vs quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with_ci = deltas[deltas["n_items"].fillna(0) > 0]
    fig, ax = plt.subplots(figsize=(8, max(2.5, 0.28 * len(with_ci))))
    labels = [f"{r.metric} / {r.category}" for r in with_ci.itertuples()]
    colors = ["#c0392b" if s == REGRESSION else "#7f8c8d" if s == NOT_MEASURABLE else "#27ae60" for s in with_ci["status"]]
    y = np.arange(len(with_ci))
    ax.errorbar(with_ci["delta"], y, xerr=[with_ci["delta"] - with_ci["ci_low"], with_ci["ci_high"] - with_ci["delta"]], fmt="none", ecolor="#555")
    ax.scatter(with_ci["delta"], y, c=colors, zorder=3)
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y, labels, fontsize=7)
    ax.set_xlabel("quantized − base (95% paired bootstrap CI)")
    deltas_png = _png(fig)
    plt.close(fig)

    def pick(results, metric, category):
        row = results[(results["metric"] == metric) & (results["category"] == category)]
        return float(row["value"].iloc[0]) if len(row) else float("nan")

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, (x_label, xs) in zip(axes, (("size on disk (MB)", (sizes["base_mb"], sizes["quantized_mb"])), ("latency p50 (s)", (pick(base_results, "latency_p50_s", "cost"), pick(quant_results, "latency_p50_s", "cost"))))):
        accs = (base_results[base_results["metric"] == "acc"]["value"].mean(), quant_results[quant_results["metric"] == "acc"]["value"].mean())
        ax.scatter(xs, accs, c=["#2c3e50", "#e67e22"])
        for x, a, name in zip(xs, accs, ("base", "quantized")):
            ax.annotate(name, (x, a), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel(x_label)
        ax.set_ylabel("mean MC accuracy")
    cost_png = _png(fig)
    plt.close(fig)
    table = deltas.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="–", classes="deltas")
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>Delta report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse;font-size:12px}}td,th{{border:1px solid #ccc;padding:3px 6px}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:1em}}</style></head>
<body><h1>Delta report</h1><pre>{html.escape(markdown)}</pre>
<h2>Per-slice deltas with 95% intervals</h2><img src="data:image/png;base64,{deltas_png}">
<h2>Cost vs quality</h2><img src="data:image/png;base64,{cost_png}">
<h2>All rows</h2>{table}</body></html>"""


def item_table(base_items: pd.DataFrame, quant_items: pd.DataFrame) -> pd.DataFrame:
    """Per item, side by side: prompt id, slice, base output, quantized output, scores."""
    drop = ["model", "output_ids", "probe_text"]
    b = base_items.drop(columns=drop, errors="ignore").set_index(["task", "category", "item_id"]).add_prefix("base_")
    q = quant_items.drop(columns=drop, errors="ignore").set_index(["task", "category", "item_id"]).add_prefix("quantized_")
    return b.join(q, how="outer").reset_index().dropna(axis=1, how="all")


@dg.asset(group_name="audit", kinds={"pandas", "html"})
def delta_report(context: dg.AssetExecutionContext, settings: AuditSettings, mlflow: MlflowTracker, quantized_artifact: dict, base_eval_results: dict, quantized_eval_results: dict) -> dg.MaterializeResult:
    """Per-slice quantized-vs-base deltas with paired intervals, judged against the pre-committed policy."""
    policy_path = Path(settings.policy_file)
    policy, policy_hash = load_policy(policy_path)
    base_results, quant_results = pd.read_parquet(base_eval_results["results_path"]), pd.read_parquet(quantized_eval_results["results_path"])
    base_items, quant_items = pd.read_parquet(base_eval_results["items_path"]), pd.read_parquet(quantized_eval_results["items_path"])
    deltas = compute_deltas(base_results, quant_results, policy, base_items, quant_items)
    aid = quantized_artifact["artifact_id"]
    markdown = render_markdown(deltas, policy, policy_hash, aid)
    out_dir = settings.store / "reports" / aid
    out_dir.mkdir(parents=True, exist_ok=True)
    deltas.to_parquet(out_dir / "delta_report.parquet")
    (out_dir / "delta_report.md").write_text(markdown)
    sizes = {"base_mb": quantized_artifact.get("base_size_bytes", 0) / 2**20, "quantized_mb": quantized_artifact["size_bytes"] / 2**20}
    (out_dir / "delta_report.html").write_text(render_html(deltas, markdown, base_results, quant_results, sizes))
    gated = deltas[deltas["status"] != UNGATED]
    passed = bool(len(gated) and gated["passed"].all())
    record = {
        "artifact_id": aid, "model_name": quantized_artifact["model_name"], "registry_version": quantized_artifact["registry_version"],
        "policy_path": str(policy_path.resolve()), "policy_hash": policy_hash, "policy_name": policy.name, "allow_override": policy.allow_override,
        "passed": passed, "failing": deltas.loc[deltas["status"] == REGRESSION, ["category", "metric"]].to_dict("records"),
        "not_measurable": deltas.loc[deltas["status"] == NOT_MEASURABLE, ["category", "metric"]].to_dict("records"),
        "measured_metrics": sorted(deltas["metric"].unique()) if len(deltas) else [], "policy_metrics": sorted(policy.tolerances),
        "categories": sorted(deltas["category"].unique()) if len(deltas) else [],
        "path": str(out_dir / "delta_report.parquet"), "markdown_path": str(out_dir / "delta_report.md"), "html_path": str(out_dir / "delta_report.html"),
    }  # fmt: skip
    write_json_atomic(out_dir / "delta_report.json", record)
    record_event(settings.store, record["model_name"], {
        "event": "evaluated", "artifact_id": aid, "registry_version": record["registry_version"], "passed": passed,
        "failing": record["failing"], "policy_name": policy.name, "policy_hash": policy_hash, "dagster_run_id": context.run.run_id,
        "deltas": deltas[deltas["status"] != UNGATED][["category", "metric", "base", "quantized", "delta", "ci_low", "ci_high", "tolerance", "status"]].to_dict("records"),
    })  # fmt: skip
    with mlflow.stage_run(record["model_name"], "delta_report", {"dagster_run_id": context.run.run_id, "artifact_id": aid, "policy_hash": policy_hash}) as run:
        run.log_params({"policy_name": policy.name, "policy_hash": policy_hash, "passed": passed})
        run.log_metrics({f"delta/{r.metric}/{r.category}": r.delta for r in deltas.itertuples()} | {"slices_failed": len(record["failing"]), "slices_not_measurable": len(record["not_measurable"])})
        for name in ("delta_report.md", "delta_report.parquet", "delta_report.json", "delta_report.html"):
            run.log_file(out_dir / name)
        run.log_file(policy_path, "policy")
        run.client.log_table(run.run_id, data=item_table(base_items, quant_items), artifact_file="eval_items.json")
    mlflow.set_version_tags(record["model_name"], quantized_artifact["registry_version"], {"delta_passed": passed, "policy_hash": policy_hash})
    return dg.MaterializeResult(
        value=record,
        metadata={
            "report": dg.MetadataValue.md(markdown),
            "html_report": dg.MetadataValue.path(record["html_path"]),
            "passed": passed,
            "slices": len(gated),
            "slices_failed": len(record["failing"]),
            "slices_not_measurable": len(record["not_measurable"]),
            "policy_hash": policy_hash,
            **run.metadata(),
        },
    )


@dg.asset_check(asset=delta_report, blocking=True, description="No slice regressed beyond the policy's tolerance (one bad slice fails the gate).")
def slices_within_tolerance(delta_report: dict) -> dg.AssetCheckResult:
    failing = delta_report["failing"]
    return dg.AssetCheckResult(
        passed=delta_report["passed"],
        metadata={"failing_slices": ", ".join(f"{f['metric']}/{f['category']}" for f in failing) or "none", "not_measurable": len(delta_report.get("not_measurable", []))},
    )


@dg.asset_check(asset=delta_report, blocking=True, description="Every metric the policy names was measured on both models (no silent gaps).")
def policy_metrics_measured(delta_report: dict) -> dg.AssetCheckResult:
    missing = sorted(set(delta_report["policy_metrics"]) - set(delta_report["measured_metrics"]))
    return dg.AssetCheckResult(passed=not missing, metadata={"missing_metrics": ", ".join(missing) or "none"})
