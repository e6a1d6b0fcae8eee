"""Progress a person can watch: a bar on an interactive terminal, a line in the Dagster run log.

A stage that runs for minutes and shows nothing reads as hung. The work loops (greedy generation,
reference states) advance a `Progress`; it draws a tqdm bar when stderr is a terminal, and when the
running asset has opened `log_progress(context.log.info)` it also writes a line (done / total,
tokens per second, ETA) at most every `LOG_EVERY_S` seconds and once at the end, so the run log in
the UI moves too. The loops stay pure functions: the log sink travels in a context variable.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Callable, Iterator

LOG_EVERY_S = 15.0
_sink: contextvars.ContextVar[Callable[[str], None] | None] = contextvars.ContextVar("qp_progress", default=None)


@contextlib.contextmanager
def log_progress(log: Callable[[str], None]) -> Iterator[None]:
    """Send the progress lines of the work inside the block to ``log`` (e.g. `context.log.info`)."""
    token = _sink.set(log)
    try:
        yield
    finally:
        _sink.reset(token)


class Progress:
    """``total`` units of work called ``label``; `advance(n, tokens=k)` as they complete."""

    def __init__(self, label: str, total: int, unit: str = "items", bar: bool = True):
        from tqdm.auto import tqdm

        self.label, self.total, self.unit = label, total, unit
        self.done, self.tokens, self.logged = 0, 0, -1
        self.start = self.last_log = time.perf_counter()
        # bar=False where the library already draws one (GPTQ's block bar): the run-log lines only
        self.bar = tqdm(
            total=total, desc=label, unit=unit, disable=None if bar else True, leave=False, dynamic_ncols=True
        )

    def advance(self, n: int = 1, tokens: int = 0) -> None:
        self.done += n
        self.tokens += tokens
        elapsed = time.perf_counter() - self.start
        if tokens:
            self.bar.set_postfix_str(f"{self.tokens / max(elapsed, 1e-9):.0f} tok/s", refresh=False)
        self.bar.update(n)
        if time.perf_counter() - self.last_log >= LOG_EVERY_S:
            self._log(elapsed)

    def extend(self, n: int) -> None:
        """`n` more units of work, found as the work goes (a library that queues its work in batches)."""
        self.total += n
        self.bar.total = self.total

    def line(self, elapsed: float) -> str:
        rate = f", {self.tokens / elapsed:.0f} tok/s" if self.tokens and elapsed > 0 else ""
        left = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
        eta = f", ETA {left:.0f} s" if self.done < self.total and self.done else ""
        return f"{self.label}: {self.done}/{self.total} {self.unit} in {elapsed:.0f} s{rate}{eta}"

    def _log(self, elapsed: float) -> None:
        sink = _sink.get()
        if sink is not None:
            sink(self.line(elapsed))
        self.last_log, self.logged = time.perf_counter(), self.done

    def close(self) -> None:
        self.bar.close()
        if self.logged != self.done:  # the final count, once
            self._log(time.perf_counter() - self.start)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
