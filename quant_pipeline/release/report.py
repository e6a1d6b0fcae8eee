"""The living audit trail, rendered: every release event of a model, in one self-contained report.

An auditor asks "what changed, who decided, on what evidence"; the answer is the model's
hash-chained trail (audits with their triggers, evaluations with their deltas, approvals,
rejections, promotions, rollbacks) plus the artifact records, rendered as Markdown and HTML,
refreshed by the `audit_report` asset on every audit and on demand by `quant-pipeline audit-report`.

The HTML is evidence on its own: for every evaluation it names the exact bytes judged (full hashes,
taken from the trail's `audit` entry), the rule (the pinned policy's copy, re-hashed before it is
believed), the result per slice (the trail's `deltas`), and the decisions that followed (who, when,
why). Hooks for browser tests, besides those of `evaluation.delta_html`: `#integrity` (class
`integrity-intact` or `integrity-broken`), `#rules`, `table#events` (one row per trail entry, `data-seq`),
one `section.audit` per evaluation (id `audit-<seq>`, newest first) holding `.verdict`, `table.identity`,
`.decision`, `section.policy` and `table.slices`, and `#candidates` (the latest tradeoff, if any).
"""

from __future__ import annotations

import datetime as dt
import html
import json
from pathlib import Path

import pandas as pd

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.core.store import ArtifactStore, write_text_atomic
from quant_pipeline.core.tracking import APPROVED_ALIAS, MlflowTracker
from quant_pipeline.evaluation.delta_html import audit_parts, page, policy_section, rules_section
from quant_pipeline.evaluation.plots import svg_data_uri
from quant_pipeline.evaluation.policy import Policy, load_policy
from quant_pipeline.evaluation.report_context import DecisionNote, ReportContext
from quant_pipeline.release.evidence import DECISIONS
from quant_pipeline.release.governing import pinned_policy_file
from quant_pipeline.release.signoff import PRODUCTION_ALIAS
from quant_pipeline.release.trail import read_verified


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


def _pinned_policy(store: ArtifactStore, policy_hash: str | None) -> Policy | None:
    """The policy an evaluation was judged under, from the store's copy named by its hash (None if that copy
    is missing or no longer hashes to it: an altered bar is not shown as the bar)."""
    if not policy_hash:
        return None
    try:
        return load_policy(pinned_policy_file(store, policy_hash))[0]
    except AuditInputError:
        return None


def _eval_keys(store: ArtifactStore, evaluated: dict) -> tuple[str | None, str | None]:
    """Which base and quantized evaluations were compared: read from the delta report the entry names, only if
    it still hashes to the `report_sha256` the trail recorded."""
    try:
        path = store.delta_report_dir(evaluated["artifact_id"], evaluated["report_key"]) / "delta_report.json"
        if path.is_file() and sha256_file(path) == evaluated.get("report_sha256"):
            report = json.loads(path.read_text(encoding="utf-8"))
            return report.get("base_eval_key"), report.get("eval_key")
    except (KeyError, ValueError, OSError):
        pass
    return None, None


def _artifact_fields(store: ArtifactStore, artifact_id: str) -> dict:
    """The artifact record's fields, for what the trail's `audit` entry does not carry (the calibration count)."""
    try:
        return json.loads(store.artifact_record_path(artifact_id).read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return {}


def distinct_judgements(evaluations: list[dict]) -> list[tuple[dict, list[int]]]:
    """Each judgement once: a re-audit that reuses everything judges the same report again (same sha256), and
    each time is on the trail, but a reviewer needs it once. Returns, oldest first, the newest entry of each run of
    an artifact's identical judgements with the trail entries of the earlier ones; a different report in between
    (another policy, another evaluation) starts a new run."""
    shown: list[tuple[dict, list[int]]] = []
    latest: dict[str, int] = {}  # artifact ID -> its newest judgement's index in `shown`
    for e in evaluations:
        i = latest.get(e["artifact_id"])
        if i is not None and e.get("report_sha256") and shown[i][0].get("report_sha256") == e["report_sha256"]:
            shown[i] = (e, [*shown[i][1], shown[i][0]["seq"]])
        else:
            latest[e["artifact_id"]] = len(shown)
            shown.append((e, []))
    return sorted(shown, key=lambda pair: pair[0]["seq"])


def evaluation_context(
    store: ArtifactStore | Path, entries: list[dict], evaluated: dict, since: int | None = None
) -> ReportContext:
    """The identity of one `evaluated` trail entry: the bytes from the artifact's last `audit` entry before it,
    the policy from its pinned copy, and the decisions on the artifact after it (after `since`, the first of its
    identical judgements, when given) until its next evaluation."""
    store = ArtifactStore.of(store)
    aid, seq = evaluated["artifact_id"], evaluated["seq"]
    audits = [e for e in entries if e.get("event") == "audit" and e.get("artifact_id") == aid and e["seq"] < seq]
    record = _artifact_fields(store, aid)
    source = audits[-1] if audits else record
    later = [e["seq"] for e in entries if e.get("event") == "evaluated" and e.get("artifact_id") == aid]
    until = min([s for s in later if s > seq], default=float("inf"))
    decisions = [
        DecisionNote.model_validate(e)
        for e in entries
        if e.get("event") in DECISIONS
        and e.get("artifact_id") == aid
        and (seq if since is None else since) < e["seq"] < until
    ]
    base_key, eval_key = _eval_keys(store, evaluated)
    return ReportContext(
        model_name=record.get("model_name") or evaluated.get("model_name") or "",
        artifact_id=aid, registry_version=evaluated.get("registry_version"),
        content_hash=source.get("content_hash"), base_hash=source.get("base_hash"), recipe=source.get("recipe") or {},
        calibration_hash=source.get("calibration_hash"), calibration_count=record.get("calibration_count"),
        runtime_hash=source.get("runtime_hash"), policy_name=evaluated.get("policy_name") or "",
        policy_hash=evaluated["policy_hash"], policy=_pinned_policy(store, evaluated.get("policy_hash")),
        base_eval_key=base_key, eval_key=eval_key, judged_at=evaluated["at"],
        verdict=evaluated.get("verdict") or ("PASS" if evaluated.get("passed") else "FAIL"),
        reasons=evaluated.get("reasons") or [], decisions=decisions,
    )  # fmt: skip


def _markdown_table_html(markdown: str) -> str:
    """A Markdown pipe table (the tradeoff's) as an HTML table, other lines as paragraphs, all escaped."""
    out, rows = [], []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") for c in cells):  # the |---| separator line
                rows.append(cells)
            continue
        if rows:
            out.append(_table_html(rows))
            rows = []
        if line.strip():
            out.append(f"<p>{html.escape(line.lstrip('- '))}</p>")
    if rows:
        out.append(_table_html(rows))
    return "".join(out)


def _table_html(rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(store: ArtifactStore | Path, tracker: MlflowTracker, model_name: str) -> tuple[str, str]:
    """The model's report as (Markdown, HTML). The Markdown lists the events and deltas for Dagster; the
    HTML is the reviewer's document (see the module docstring for its hooks)."""
    store = ArtifactStore.of(store)
    path = store.trail_path(model_name)
    entries, problems = read_verified(path)  # what the report shows is what its integrity line speaks for
    aliases = {alias: tracker.alias_version(model_name, alias) for alias in (APPROVED_ALIAS, PRODUCTION_ALIAS)}
    generated = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    head = (entries[-1].get("hash") if entries else None) or ""
    integrity = "intact" if not problems else "BROKEN — " + "; ".join(problems)
    alias_text = ", ".join(f"`{a}` → v{v}" for a, v in aliases.items() if v) or "none"
    evaluations = [e for e in entries if e.get("event") == "evaluated" and e.get("deltas")]
    judgements = distinct_judgements(evaluations)
    contexts = [(e, evaluation_context(store, entries, e, min(earlier, default=None))) for e, earlier in judgements]
    repeats = {e["seq"]: earlier for e, earlier in judgements}
    lines = [
        f"# Audit report — {model_name}",
        f"Generated {generated} from `{path}` ({len(entries)} events, head `{head}`).",
        f"Trail integrity: {integrity}.",
        f"Aliases now: {alias_text}.",
        "",
        "| # | time (UTC) | event | artifact | version | details |",
        "|---:|---|---|---|---:|---|",
    ]
    for e in entries:
        lines.append(
            f"| {e['seq']} | {e['at'][:19]} | {e['event']} | {e.get('artifact_id') or ''} | "
            f"{e.get('registry_version') or ''} | {describe(e).replace('|', '/')} |"
        )
    for e, ctx in contexts:
        lines += [
            "",
            f"## Deltas for {e['artifact_id']} (event {e['seq']}): {ctx.verdict}",
            f"Artifact sha256 `{ctx.content_hash}`, base sha256 `{ctx.base_hash}`, calibration sha256 "
            f"`{ctx.calibration_hash or 'none (data-free)'}`, runtime sha256 `{ctx.runtime_hash}`, policy "
            f"{ctx.policy_name} sha256 `{ctx.policy_hash}`; decision: {ctx.decision}.",
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
    tradeoff = store.report_dir(model_name) / "tradeoff"
    candidates = ""
    if (tradeoff / "tradeoff.md").exists():  # the latest comparison of the model's candidates (candidate_tradeoff)
        table = (tradeoff / "tradeoff.md").read_text().split("\n", 2)[-1]
        lines += ["", "## Candidates", "", table]
        plot = tradeoff / "tradeoff.svg"
        figure = (
            f'<img alt="cost against worst regression, per candidate" style="max-width:100%" '
            f'src="{svg_data_uri(plot.read_text())}">'
            if plot.exists()
            else ""
        )
        candidates = f'<section id="candidates"><h2>Candidates</h2>{_markdown_table_html(table)}{figure}</section>'
    events = "".join(
        f'<tr data-seq="{e["seq"]}"><td class=num>{e["seq"]}</td><td>{html.escape(e["at"][:19])}</td>'
        f"<td>{html.escape(str(e.get('event')))}</td><td>{html.escape(e.get('artifact_id') or '')}</td>"
        f"<td>{html.escape(str(e.get('registry_version') or ''))}</td><td>{html.escape(describe(e))}</td></tr>"
        for e in entries
    )
    sections = "".join(
        f'<section class="audit" id="audit-{e["seq"]}"><h2>Evaluation of {html.escape(e["artifact_id"])} '
        f"(trail entry {e['seq']}, {html.escape(e['at'][:19])} UTC)</h2>"
        + (
            f'<p class="repeats">The same report (sha256 {html.escape(e["report_sha256"])}) was judged before at '
            f"trail entries {', '.join(map(str, repeats[e['seq']]))}: re-audits that reused every input.</p>"
            if repeats[e["seq"]]
            else ""
        )
        + audit_parts(ctx, pd.DataFrame(e["deltas"]), with_ids=False)
        + f"<details><summary>The policy it was judged under</summary>{policy_section(ctx, with_ids=False)}</details>"
        + "</section>"
        for e, ctx in reversed(contexts)
    )
    body = (
        f"<h1>Audit report — {html.escape(model_name)}</h1>"
        f'<table class="identity"><tr><th scope="row">Model</th><td>{html.escape(model_name)}</td></tr>'
        f'<tr><th scope="row">Generated (UTC)</th><td>{generated}</td></tr>'
        f'<tr><th scope="row">Trail</th><td><code>{html.escape(str(path))}</code>, {len(entries)} events</td></tr>'
        f'<tr><th scope="row">Trail head hash (sha256)</th><td><code>{html.escape(head)}</code></td></tr>'
        f'<tr><th scope="row">Aliases now</th><td>{html.escape(alias_text)}</td></tr></table>'
        f'<p id="integrity" class="integrity-{"intact" if not problems else "broken"}">'
        f"Trail integrity: {html.escape(integrity)}.</p>"
        + rules_section(contexts[-1][1].policy if contexts else None)
        + f"<h2>Evaluations ({len(contexts)}, newest first)</h2>{sections or '<p>No evaluation recorded yet.</p>'}"
        + candidates
        + '<section><h2>Release events</h2><table id="events"><thead><tr><th>#</th><th>time (UTC)</th>'
        "<th>event</th><th>artifact</th><th>version</th><th>details</th></tr></thead>"
        f"<tbody>{events}</tbody></table></section>"
    )
    return "\n".join(lines), page(f"Audit report {model_name}", body)


def write_report(store: ArtifactStore | Path, tracker: MlflowTracker, model_name: str) -> tuple[Path, Path]:
    markdown, page_html = render(store, tracker, model_name)
    out = ArtifactStore.of(store).report_dir(model_name)
    return write_text_atomic(out / "audit_report.md", markdown), write_text_atomic(out / "audit_report.html", page_html)
