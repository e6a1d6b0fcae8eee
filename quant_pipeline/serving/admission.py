"""Backpressure: a fixed number of generation slots, a bounded first-come-first-served queue, refusals.

A CPU server that queues without bound answers nobody in time once traffic exceeds what it can
generate: every request waits behind all the others. So at most `max_concurrency` requests generate
and at most `max_queue` wait; one more is refused at once (busy, HTTP 503) so the client can back off
or go elsewhere, and a waiting request gives up at its deadline (timeout, HTTP 504).

Each refusal is an exception carrying the request's log record (already written) and the HTTP status
it maps to, so every front end (the HTTP server, the CLI, the pyfunc) reports it the same way.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from quant_pipeline.release.reference import ServingError


class BadRequest(ServingError):
    """A request that cannot be served as asked (no prompt, malformed schema): refused before any work,
    not logged (there is nothing a model did to record). HTTP 400."""

    http_status = 400


class RequestRefused(ServingError):
    """A well-formed request that was not answered; its log record (written once) says why."""

    status = "error"
    http_status = 500

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


class OverBudget(RequestRefused):
    status, http_status = "over_budget", 400


class ServerBusy(RequestRefused):
    status, http_status = "busy", 503


class RequestTimeout(RequestRefused):
    status, http_status = "timeout", 504


class DeadlinePassed(Exception):
    """Raised between two decode steps once a request's deadline has passed (stops the generation)."""


class Admission:
    """`max_concurrency` slots and a FIFO of at most `max_queue` waiters; thread-safe.

    A slot freed while requests wait is handed to the oldest waiter directly, so a newcomer never
    jumps the queue."""

    def __init__(self, max_concurrency: int, max_queue: int):
        self.max_concurrency, self.max_queue = max_concurrency, max_queue
        self._lock = threading.Lock()
        self._waiting: deque[threading.Event] = deque()
        self._in_flight = 0

    def snapshot(self) -> tuple[int, int]:
        """(requests generating, requests waiting) right now."""
        with self._lock:
            return self._in_flight, len(self._waiting)

    def enter(self, deadline: float) -> str:
        """Take a slot: "ok" (call `leave` when done), "busy" (none free, queue full) or "timeout"
        (waited until `deadline`, a `time.monotonic()` value)."""
        with self._lock:
            if self._in_flight < self.max_concurrency and not self._waiting:
                self._in_flight += 1
                return "ok"
            if len(self._waiting) >= self.max_queue:
                return "busy"
            turn = threading.Event()
            self._waiting.append(turn)
        turn.wait(max(0.0, deadline - time.monotonic()))
        with self._lock:
            if turn.is_set():  # handed a slot (possibly just as the wait timed out)
                return "ok"
            self._waiting.remove(turn)
            return "timeout"

    def leave(self) -> None:
        with self._lock:
            if self._waiting:
                self._waiting.popleft().set()  # the slot passes on: in-flight count unchanged
            else:
                self._in_flight -= 1
