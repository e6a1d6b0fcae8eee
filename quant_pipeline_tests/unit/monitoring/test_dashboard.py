"""Stored windows and the per-model dashboard: a self-contained page drawn from the store alone."""

import re

from quant_pipeline.core.store import ArtifactStore
from quant_pipeline.monitoring.dashboard import WindowRecord, load_windows, save_window, write_dashboard
from quant_pipeline.monitoring.drift import detect_drift
from quant_pipeline.monitoring.requests import LoggedRequest
from quant_pipeline.monitoring.signals import window_signals
from quant_pipeline_tests.traffic import HOUR, WINDOW_START, arm_traffic


def record(hour: int, canary_invalid: int) -> WindowRecord:
    start = WINDOW_START + hour * HOUR
    rows = arm_traffic("production", 60, version="1", start=start, declared=30, shadow_identical=50)
    rows += arm_traffic("canary", 60, version="2", start=start, declared=30, invalid=canary_invalid)
    entries = [LoggedRequest.model_validate(r) for r in rows]
    return WindowRecord(
        signals=window_signals("tiny", entries, start, start + HOUR), drift=detect_drift([e.prompt for e in entries])
    )


def test_windows_round_trip_and_the_dashboard_needs_no_network(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    for hour, invalid in ((2, 20), (0, 0), (1, 3)):
        save_window(store, record(hour, invalid))
    save_window(store, record(1, 4))  # a window re-run with more requests replaces its record
    windows = load_windows(store, "tiny")
    assert [w.signals.start for w in windows] == [WINDOW_START + h * HOUR for h in range(3)]
    assert windows[1].signals.arms["canary"].validation_failure_rate.events == 4
    assert len(windows[0].signals.arms["canary"].latencies) == 60  # kept for the latency bootstrap
    events = [{"at": "2026-11-20T12:30:00+00:00", "event": "canary rolled back", "registry_version": "2",
               "by": "quant_pipeline (live monitoring)", "note": "roll back canary: <validation>"}]  # fmt: skip
    path, png = write_dashboard(store, "tiny", events)
    page = path.read_text()
    assert path == store.report_dir("tiny") / "monitoring" / "dashboard.html" and png.startswith(b"\x89PNG")
    assert "<svg" in page and "3 hourly windows" in page and "canary rolled back" in page
    assert "roll back canary: &lt;validation&gt;" in page  # escaped, not markup
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page), "an external reference"
    assert "<script" not in page and "<link" not in page and "<!DOCTYPE svg" not in page
    assert "Drift: no drift: prompt_length_psi" in page and "120 requests" in page  # the latest window's line
