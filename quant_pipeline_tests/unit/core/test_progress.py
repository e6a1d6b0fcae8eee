"""Progress lines: at most one per interval while work advances, the final count exactly once."""

import pytest

from quant_pipeline.core import progress
from quant_pipeline.core.progress import Progress, log_progress


def test_progress_logs_to_the_sink_of_the_block_and_the_final_count_once(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    lines: list[str] = []
    with log_progress(lines.append), Progress("base behaviour suite", 4, "prompts") as p:
        for at, n in ((5.0, 1), (20.0, 2), (40.0, 1)):  # 5 s: not yet; 20 s: a line; 40 s: a line, close adds none
            now[0] = at
            p.advance(n, tokens=10 * n)
    assert lines == [
        "base behaviour suite: 3/4 prompts in 20 s, 2 tok/s, ETA 7 s",
        "base behaviour suite: 4/4 prompts in 40 s, 1 tok/s",
    ]


def test_progress_without_a_sink_writes_no_line():
    with Progress("quiet", 2) as p:
        p.advance(2)
    assert p.logged == 2 and p.line(1.0) == "quiet: 2/2 items in 1 s"


@pytest.mark.parametrize("done", [0, 1])
def test_close_reports_the_final_count_when_it_was_not_logged(done):
    lines: list[str] = []
    with log_progress(lines.append):
        p = Progress("x", 3)
        if done:
            p.advance(done)
        p.close()
    assert len(lines) == 1 and lines[0].startswith(f"x: {done}/3 items")
