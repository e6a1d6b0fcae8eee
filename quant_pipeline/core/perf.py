"""Wall time and peak memory per stage, because performance is part of what we audit.

Peak RSS is sampled by a background thread (process-wide ``ru_maxrss`` only ever grows, so it
cannot tell one stage from the next when stages share a process).
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import psutil


@dataclass
class StageMeter:
    interval_s: float = 0.02
    wall_s: float = 0.0
    peak_rss_mb: float = 0.0
    start_rss_mb: float = 0.0
    started: float = 0.0  # time.time() at entry: the stage's MLflow run starts here, not when it is logged
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)

    def __enter__(self) -> StageMeter:
        proc = psutil.Process()
        self.start_rss_mb = self.peak_rss_mb = proc.memory_info().rss / 2**20
        self.started = time.time()
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


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _glibc(call: str, *args: int) -> bool:
    """glibc's malloc tuning call, or False where the C library is not glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    try:
        return bool(getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), call)(*args))
    except (OSError, AttributeError):
        return False


def bound_heap_fragmentation(threshold_bytes: int = 1 << 20) -> bool:
    """Serve every allocation of `threshold_bytes` or more with its own mapping, returned to the OS when freed.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MB), after which blocks
    below it come from the heap, and a heap whose freed blocks sit below ones still alive cannot shrink.
    Measured when reference states kept a tensor per text (523 texts): peak RSS 14.7 GB, 1.3 GB with this;
    on the default model's greedy generation now: 3.1 GB without, 2.2 GB with, the same time. A fixed
    threshold also turns the dynamic adjustment off. Returns False where the C library is not glibc (no change)."""
    return _glibc("mallopt", _M_MMAP_THRESHOLD, threshold_bytes)


@contextmanager
def heap_for_temporaries():
    """Within: blocks under 32 MB (glibc's own dynamic maximum) come from the heap, whose freed pages stay mapped
    for the next block; on exit the process's bound (above) is back and the heap's free pages are returned.

    For a loop that allocates and frees the same large temporaries over and over and keeps nothing between them
    but what it writes into buffers made before it (reference states): under the 1 MB bound each vocabulary-sized
    block was mapped, faulted in page by page and unmapped every time. Default model's base evaluation, one
    process: reference states 178.8 s -> 143.3 s, identical tensors; the evaluation's peak RSS 2.15 -> 2.26 GB.
    (The harness, tried the same way: 70.2 s -> 71.2 s, so it is left under the bound.)"""
    _glibc("mallopt", _M_MMAP_THRESHOLD, 32 << 20)
    try:
        yield
    finally:
        bound_heap_fragmentation()
        _glibc("malloc_trim", 0)


# The libraries an audit's stages import (lazily, so the read-only CLI verbs stay fast).
AUDIT_STACK = ("torch", "transformers", "lm_eval", "mlflow", "optimum.gptq", "gptqmodel")


def freeze_import_heap() -> None:
    """Import the audit's libraries and move every object alive then out of the garbage collector's sight.

    Those objects (modules, classes, functions: about 800,000 once the stack is imported) live as long as the
    process, yet every full collection walks them all: 0.4-0.7 s each, and gptqmodel calls `gc.collect()` after
    each quantization and model load. Frozen, a collection walks only what the audit itself made. Measured on
    the tiny-model audit (one process, the machine shared): time in the collector 5.4 s -> 1.1-1.6 s per audit.
    Collected first, so no garbage is frozen; once per process, so nothing an audit made (and may drop in a
    cycle later) is frozen with it; objects made later are collected as before."""
    import gc
    import importlib

    if _frozen.is_set():
        return
    for name in AUDIT_STACK:
        importlib.import_module(name)
    gc.collect()
    gc.freeze()
    _frozen.set()


_frozen = threading.Event()
