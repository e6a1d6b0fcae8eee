"""Each window's signals kept in the store, and one self-contained HTML dashboard per model across windows.

The per-window record (signals + drift, JSON) is what the dashboard is drawn from, so the page can be
rebuilt from the store alone, and MLflow holds the same numbers as metrics for its own charts. The page has
no external reference (inline SVG, inline CSS): it opens from a file, a CI artifact or an air-gapped
machine. Not-measurable points are gaps in a line, never zeros.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from pathlib import Path

from pydantic import BaseModel, ValidationError

from quant_pipeline.core.store import ArtifactStore, write_json_atomic, write_text_atomic
from quant_pipeline.monitoring.drift import DriftReport
from quant_pipeline.monitoring.signals import ArmSignals, Rate, WindowSignals

DASHBOARD_WINDOWS = 24 * 7  # the last week of hourly windows: older ones stay in the store and in MLflow
ARM_COLOURS = {"production": "#1f77b4", "canary": "#d62728", "base": "#7f7f7f"}
PANELS = (  # title, what to read from an arm (a Rate is drawn with its interval; None: not measurable), y label
    ("requests", lambda a: a.requests, "requests"),
    ("error + timeout rate", lambda a: _sum_rates(a, "error_rate", "timeout_rate"), "share of requests"),
    ("output validation failures (95% interval)", lambda a: a.validation_failure_rate, "share of declared"),
    ("refusal rate (95% interval)", lambda a: a.refusal_rate, "share of completed"),
    ("latency p95", lambda a: a.latency_s.p95, "seconds"),
    ("fallback to base (95% interval)", lambda a: a.fallback_rate, "share of requests"),
)
NAN = float("nan")


class WindowRecord(BaseModel):
    """What monitoring stored for one window of one model."""

    signals: WindowSignals
    drift: DriftReport


def _sum_rates(arm: ArmSignals, *names: str) -> float | None:
    rates = [getattr(arm, n) for n in names]
    return sum(r.value for r in rates) if all(r.measurable for r in rates) else None


def monitoring_dir(store: ArtifactStore | Path, model_name: str) -> Path:
    return ArtifactStore.of(store).report_dir(model_name) / "monitoring"


def save_window(store: ArtifactStore | Path, record: WindowRecord) -> Path:
    """Write (or replace: a window re-run sees more requests) one window's record, atomically."""
    start = record.signals.start.astimezone(dt.UTC)
    path = monitoring_dir(store, record.signals.model_name) / "windows" / f"{start:%Y%m%dT%H%M}Z.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(path, record.model_dump(mode="json"))


def load_windows(store: ArtifactStore | Path, model_name: str) -> list[WindowRecord]:
    """Every stored window of the model, oldest first (a file that is not a window record is skipped)."""
    folder = monitoring_dir(store, model_name) / "windows"
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            records.append(WindowRecord.model_validate_json(path.read_text()))
        except (ValidationError, OSError):
            continue
    return sorted(records, key=lambda r: r.signals.start)


def figure(records: list[WindowRecord]):
    """The signals of every window as time series, one panel each, arms in their own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(4, 2, figsize=(11, 11), sharex=True)
    times = [r.signals.start for r in records]
    arms = sorted({a for r in records for a in r.signals.arms})
    for ax, (title, read, unit) in zip(axes.flat, PANELS, strict=False):
        for arm in arms:
            values = [read(r.signals.arms[arm]) if arm in r.signals.arms else None for r in records]
            rates = [v for v in values if isinstance(v, Rate)]
            if rates:  # the point and its Wilson interval, shaded
                low = [v.low if isinstance(v, Rate) and v.measurable else NAN for v in values]
                high = [v.high if isinstance(v, Rate) and v.measurable else NAN for v in values]
                ax.fill_between(times, low, high, alpha=0.15, color=ARM_COLOURS.get(arm))
                values = [v.value if isinstance(v, Rate) else v for v in values]
            ys = [NAN if v is None else v for v in values]
            ax.plot(times, ys, marker="o", ms=3, label=arm, color=ARM_COLOURS.get(arm))
        ax.set_title(title, fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
    shadow_ax, drift_ax = axes.flat[len(PANELS)], axes.flat[len(PANELS) + 1]
    for arm in sorted({a for r in records for a in r.signals.shadow}):
        rows = [r.signals.shadow.get(arm) for r in records]
        identical = [s.identical_rate.value if s and s.identical_rate.measurable else None for s in rows]
        prefix = [s.prefix_agreement_mean if s else None for s in rows]
        for label, values, style in (("identical", identical, "-"), ("prefix agreement", prefix, "--")):
            ys = [NAN if v is None else v for v in values]
            shadow_ax.plot(times, ys, style, marker="o", ms=3, label=f"{arm} {label}", color=ARM_COLOURS.get(arm))
    shadow_ax.set_title("shadow agreement with the served answer", fontsize=10)
    for name, key, bar in (("prompt_length_psi", "prompt_length_psi", "psi_threshold"),
                           ("word_unigram_jsd", "word_unigram_jsd", "jsd_threshold")):  # fmt: skip
        ys = [getattr(r.drift, key) / getattr(r.drift, bar) if r.drift.measurable else NAN for r in records]
        drift_ax.plot(times, ys, marker="o", ms=3, label=name)
    drift_ax.axhline(1.0, color="black", lw=0.8, ls=":")
    drift_ax.set_title("prompt drift (statistic / its threshold; > 1 is drift)", fontsize=10)
    for ax in axes.flat:
        ax.set_ylim(bottom=0)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.tick_params(labelsize=7)
    fig.autofmt_xdate()
    fig.tight_layout()
    return fig


def _table(arms: dict[str, ArmSignals]) -> str:
    rows = ("requests", "error_rate", "timeout_rate", "busy_rate", "over_budget_rate", "fallback_rate",
            "refusal_rate", "validation_failure_rate", "schema_failure_rate", "tool_call_validity")  # fmt: skip
    head = "".join(f"<th>{html.escape(a)}</th>" for a in arms)
    body = []
    for row in rows:
        cells = "".join(
            f"<td>{html.escape(str(v) if isinstance(v := getattr(a, row), int) else v.text())}</td>"
            for a in arms.values()
        )
        body.append(f"<tr><th>{row}</th>{cells}</tr>")
    lat = "".join(
        f"<td>{'not measurable' if not a.latency_s.measurable else f'{a.latency_s.p50:.3f} / {a.latency_s.p95:.3f} / {a.latency_s.p99:.3f}'}</td>"  # noqa: E501
        for a in arms.values()
    )
    body.append(f"<tr><th>latency p50 / p95 / p99 s</th>{lat}</tr>")
    return f"<table><tr><th></th>{head}</tr>{''.join(body)}</table>"


def render(model_name: str, records: list[WindowRecord], events: list[dict]) -> tuple[str, bytes]:
    """(the HTML page, the same figure as PNG): the page inlines the figure as SVG."""
    import matplotlib.pyplot as plt

    fig = figure(records)
    svg, png = io.StringIO(), io.BytesIO()
    fig.savefig(svg, format="svg")
    fig.savefig(png, format="png", dpi=60)
    plt.close(fig)
    svg_text = svg.getvalue()
    svg_text = svg_text[svg_text.find("<svg") :]  # drop the XML prolog and DOCTYPE (and its external DTD)
    latest = records[-1] if records else None
    summary = (
        f"<p>Latest window {latest.signals.start:%Y-%m-%d %H:%M}–{latest.signals.end:%H:%M} UTC: "
        f"{latest.signals.requests} requests. Drift: {html.escape(latest.drift.why)}.</p>" + _table(latest.signals.arms)
        if latest
        else "<p>No window monitored yet.</p>"
    )
    moves = "".join(
        f"<tr><td>{html.escape(str(e.get('at', ''))[:19])}</td><td>{html.escape(str(e.get('event')))}</td>"
        f"<td>v{html.escape(str(e.get('registry_version')))}</td><td>{html.escape(str(e.get('by')))}</td>"
        f"<td>{html.escape(str(e.get('note', ''))[:600])}</td></tr>"
        for e in events
    )
    name = html.escape(model_name)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Live monitoring — {name}</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:1100px}} table{{border-collapse:collapse;font-size:13px}}
td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left}}</style></head><body>
<h1>Live monitoring — {name}</h1>
<p>{len(records)} hourly windows; generated {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC. Rates carry Wilson 95%
intervals; "not measurable" means the arm had no request of that kind, not zero.</p>
{summary}
<h2>Signals across windows</h2>
{svg_text}
<h2>Canary moves</h2>
<table><tr><th>time (UTC)</th><th>event</th><th>version</th><th>by</th><th>why</th></tr>{moves}</table>
</body></html>
"""
    return page, png.getvalue()


def write_dashboard(store: ArtifactStore | Path, model_name: str, events: list[dict]) -> tuple[Path, bytes]:
    """Render the model's last DASHBOARD_WINDOWS stored windows into `reports/<model>/monitoring/dashboard.html`."""
    page, png = render(model_name, load_windows(store, model_name)[-DASHBOARD_WINDOWS:], events)
    path = monitoring_dir(store, model_name) / "dashboard.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, page), png


def png_markdown(png: bytes) -> str:
    """A PNG as Markdown that Dagster's UI shows inline."""
    return f"![live signals](data:image/png;base64,{base64.b64encode(png).decode()})"
