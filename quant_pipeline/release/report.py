"""The living audit trail, rendered: every release event of a model, in one self-contained report.

An auditor asks "what changed, who decided, on what evidence"; the answer is the model's
hash-chained trail (audits with their triggers, evaluations with their deltas, approvals,
rejections, promotions, rollbacks) plus the artifact records, rendered as Markdown and HTML,
refreshed by the `audit_report` asset on every audit and on demand by `quant-pipeline audit-report`.
"""

import base64
import datetime as dt
import html
import json
from pathlib import Path

from quant_pipeline.core.store import ArtifactStore, write_text_atomic
from quant_pipeline.core.tracking import APPROVED_ALIAS, MlflowTracker
from quant_pipeline.release.signoff import PRODUCTION_ALIAS
from quant_pipeline.release.trail import head_hash, read_entries, verify_trail


def describe(entry: dict) -> str:
    e = entry["event"]
    if e == "audit":
        change = f"{entry.get('trigger')}" + (
            f": {entry.get('from_version')} → {entry.get('to_version')}" if entry.get("from_version") else ""
        )
        return (
            f"quantized ({'reused' if entry.get('reused') else 'built'}); trigger {change}; "
            f"recipe {json.dumps(entry.get('recipe'), sort_keys=True)}"
        )
    if e == "evaluated":
        verdict = entry.get("verdict") or ("PASS" if entry.get("passed") else "FAIL")
        reasons = entry.get("reasons") or []
        why = "; ".join(reasons[:3]) + (f" (+{len(reasons) - 3} more)" if len(reasons) > 3 else "")
        waived = ", ".join(f"{w['metric']}/{w['category']}" for w in entry.get("waived") or [])
        return (
            f"{verdict} under policy {entry.get('policy_name')} ({str(entry.get('policy_hash'))[:12]})"
            f"{f': {why}' if why else ''}{f'; waived: {waived}' if waived else ''}; "
            f"report sha256 {str(entry.get('report_sha256'))[:12]}"
        )
    if e == "policy pinned":
        was = entry.get("previous_policy_hash")
        change = f"changed from {was[:12]}" if was else "first pin"
        return (
            f"policy {entry.get('policy_name')} ({str(entry.get('policy_hash'))[:12]}) pinned by {entry.get('by')} "
            f"({change}): {entry.get('reason')}"
        )
    if e == "incomplete":
        return f"not approvable (audit INCOMPLETE), recorded by {entry['by']}: {entry.get('note', '')}"
    if e == "approved":
        extra = f" with {entry['second_approver']} (OVERRIDE of failed checks)" if entry.get("override") else ""
        return (
            f"approved by {entry['by']}{extra}: {entry.get('note', '')} "
            f"(content hash {str(entry.get('content_hash'))[:12]} verified)"
        )
    if e == "rejected":
        return f"rejected by {entry['by']}: {entry.get('note', '')}"
    if e == "pending sign-off":
        return "audit finished without a named approver: pending sign-off"
    if e == "promoted":
        return (
            f"{PRODUCTION_ALIAS} → v{entry['registry_version']} by {entry['by']} "
            f"(from v{entry.get('from_version')}) {entry.get('note', '')}"
        )
    if e == "rollback":
        target = "the base model" if entry.get("to_base") else f"v{entry['registry_version']}"
        return (
            f"ROLLBACK of {PRODUCTION_ALIAS} v{entry.get('from_version')} → {target} "
            f"by {entry['by']}: {entry.get('note', '')}"
        )
    if e == "canary set":
        was = entry.get("from_version")
        return f"canary → v{entry['registry_version']} by {entry['by']} (from v{was}) {entry.get('note', '')}"
    if e == "canary rolled back":
        target = f"v{entry['to_version']} (production's)" if entry.get("to_version") else "removed"
        return f"CANARY ROLLBACK v{entry['registry_version']} → {target} by {entry['by']}: {entry.get('note', '')}"
    return json.dumps({k: v for k, v in entry.items() if k not in ("hash", "prev_hash")}, default=str)[:300]


def render(store: ArtifactStore | Path, tracker: MlflowTracker, model_name: str) -> tuple[str, str]:
    path = ArtifactStore.of(store).trail_path(model_name)
    entries = read_entries(path)
    problems = verify_trail(path)
    aliases = {alias: tracker.alias_version(model_name, alias) for alias in (APPROVED_ALIAS, PRODUCTION_ALIAS)}
    lines = [
        f"# Audit report — {model_name}",
        f"Generated {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')} from `{path}` "
        f"({len(entries)} events, head `{(head_hash(path) or '')[:16]}`).",
        f"Trail integrity: {'intact' if not problems else 'BROKEN — ' + '; '.join(problems)}.",
        f"Aliases now: {', '.join(f'`{a}` → v{v}' for a, v in aliases.items() if v) or 'none'}.",
        "",
        "| # | time (UTC) | event | artifact | version | details |",
        "|---:|---|---|---|---:|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['seq']} | {e['at'][:19]} | {e['event']} | {e.get('artifact_id') or ''} | "
            f"{e.get('registry_version') or ''} | {describe(e).replace('|', '/')} |"
        )
    for e in [x for x in entries if x["event"] == "evaluated" and x.get("deltas")]:
        lines += [
            "",
            f"## Deltas for {e['artifact_id']} (event {e['seq']})",
            "",
            "| slice | metric | base | quantized | delta [95% CI] | tolerance | status |",
            "|---|---|---:|---:|---|---:|---|",
        ]
        for d in e["deltas"]:
            ci = (
                f" [{d['ci_low']:+.4f}, {d['ci_high']:+.4f}]"
                if d.get("ci_low") == d.get("ci_low") and d.get("ci_low") is not None
                else ""
            )
            lines.append(
                f"| {d['category']} | {d['metric']} | {d['base']:.4f} | {d['quantized']:.4f} | "
                f"{d['delta']:+.4f}{ci} | {d['tolerance']:.4f} | {d['status']} |"
            )
    tradeoff = ArtifactStore.of(store).report_dir(model_name) / "tradeoff"
    if (tradeoff / "tradeoff.md").exists():  # the latest comparison of the model's candidates (candidate_tradeoff)
        lines += ["", "## Candidates", "", (tradeoff / "tradeoff.md").read_text().split("\n", 2)[-1]]
    markdown = "\n".join(lines)
    plot = tradeoff / "tradeoff.png"
    figure = (
        f'<img alt="cost against worst regression, per candidate" style="max-width:100%" '
        f'src="data:image/png;base64,{base64.b64encode(plot.read_bytes()).decode()}">'
        if plot.exists()
        else ""
    )
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Audit report {html.escape(model_name)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}pre{{white-space:pre-wrap;background:#f6f6f6;padding:1em;font-size:12px}}</style></head>
<body><pre>{html.escape(markdown)}</pre>{figure}</body></html>"""
    return markdown, page


def write_report(store: ArtifactStore | Path, tracker: MlflowTracker, model_name: str) -> tuple[Path, Path]:
    markdown, page = render(store, tracker, model_name)
    out = ArtifactStore.of(store).report_dir(model_name)
    return write_text_atomic(out / "audit_report.md", markdown), write_text_atomic(out / "audit_report.html", page)
