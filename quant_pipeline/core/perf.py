"""Wall time and peak memory per stage, because performance is part of what we audit.

Peak RSS is sampled by a background thread (process-wide ``ru_maxrss`` only ever grows, so it
cannot tell one stage from the next when stages share a process).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class StageMeter:
    interval_s: float = 0.02
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def __enter__(self) -> StageMeter:
        proc = psutil.Process()
        self.start_rss_mb = self.peak_rss_mb = proc.memory_info().rss / 2**20
        self._t0 = time.perf_counter()

        def sample() -> None:
            while not self._stop.wait(self.interval_s):
                self.peak_rss_mb = max(self.peak_rss_mb, proc.memory_info().rss / 2**20)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss_mb = max(self.peak_rss_mb, psutil.Process().memory_info().rss / 2**20)
        self.wall_s = time.perf_counter() - self._t0

    def metadata(self) -> dict[str, float]:
        return {"wall_seconds": round(self.wall_s, 3), "peak_rss_mb": round(self.peak_rss_mb, 1)}
