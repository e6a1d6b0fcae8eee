"""The request log as monitoring reads it: a tolerant, typed view of each line, and the lines of one window.

Monitoring must keep reading logs written before a field existed (the server gains fields over time: arms,
validation, shadow comparisons), so every field but the time is optional here and unknown fields are ignored;
`core.records.RequestLogEntry` stays the strict schema the serving side writes and replays. The JSONL is read
through the store, not through `serving.read_requests`: monitoring sits below serving, and no Dagster stage
may import serving (`test_architecture`). A line cut by a crash is skipped, as the serving reader does; a
line that is JSON but not a request is counted as unreadable, never silently taken for a healthy request.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError, field_validator

from quant_pipeline.core.store import ArtifactStore, read_json_lines

# Registry versions are logged as int or str depending on who wrote the line: one spelling here.
VersionText = Annotated[str | None, BeforeValidator(lambda v: None if v is None else str(v))]
UNROUTED = "unrouted"  # turned away before routing, or logged before arms existed from a pinned ref
UNROUTED_STATUSES = ("busy", "over_budget", "timeout")


class ValidationOutcome(BaseModel):
    """Whether an output met the schema or tool signature its request declared."""

    model_config = ConfigDict(extra="ignore")
    kind: str  # "schema" | "tool"
    valid: bool
    error: str | None = None


class ShadowOutcome(BaseModel):
    """The shadow arm's answer to the same prompt, compared with the answer that was served."""

    model_config = ConfigDict(extra="ignore")
    arm: str = "canary"
    model_version: VersionText = None
    artifact_id: str | None = None
    identical: bool | None = None
    prefix_agreement: float | None = None
    latency_s: float | None = None
    refused: bool | None = None
    validation: ValidationOutcome | None = None
    error: str | None = None  # the shadow run failed (raised, timed out): no output to compare


class LoggedRequest(BaseModel):
    """One request-log line, every field optional but its time (what a window is cut by)."""

    model_config = ConfigDict(extra="ignore")
    time: dt.datetime
    request_id: str | None = None
    status: str = "ok"  # "ok" | "error" | "busy" | "over_budget" | "timeout"
    arm: str | None = None  # "production" | "canary" | "base"
    ref: str | None = None
    arm_reason: str | None = None
    model_version: VersionText = None
    artifact_id: str | None = None
    prompt: str | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    latency_s: float | None = None
    fallback: bool = False
    refused: bool | None = None
    validation: ValidationOutcome | None = None
    shadow: ShadowOutcome | None = None

    @field_validator("time")
    @classmethod
    def _utc(cls, value: dt.datetime) -> dt.datetime:
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)

    @field_validator("fallback", mode="before")
    @classmethod
    def _no_fallback(cls, value: object) -> object:
        return False if value is None else value

    @property
    def served_arm(self) -> str:
        """The arm that answered. A request turned away before routing (busy, over budget, timed out in the
        queue: no arm logged) is `unrouted`; so is a line from before arms existed that was served from a
        pinned version or artifact, while one served from the `production` alias counts as production (all
        traffic was, then)."""
        if self.arm:
            return self.arm
        if self.status in UNROUTED_STATUSES or self.ref != "production":
            return UNROUTED
        return "production"


class RequestLog(BaseModel):
    """A model's logged requests, oldest first, and how many lines could not be read as one."""

    entries: list[LoggedRequest]
    unreadable: int = 0

    def window(self, start: dt.datetime, end: dt.datetime) -> list[LoggedRequest]:
        """The requests logged in [start, end)."""
        return [e for e in self.entries if start <= e.time < end]


def read_log(store: ArtifactStore | Path, model_name: str) -> RequestLog:
    """Every readable request of the model's log ([] when nothing was served yet)."""
    entries, unreadable = [], 0
    for _, obj in read_json_lines(ArtifactStore.of(store).requests_path(model_name), skip_torn=True):
        try:
            entries.append(LoggedRequest.model_validate(obj))
        except ValidationError:
            unreadable += 1
    entries.sort(key=lambda e: e.time)
    return RequestLog(entries=entries, unreadable=unreadable)


def count_requests(store: ArtifactStore | Path, model_name: str) -> int:
    """Lines in the model's request log (0 when there is none): a sensor's cheap measure of new traffic."""
    path = ArtifactStore.of(store).requests_path(model_name)
    if not path.exists():
        return 0
    count = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            count += chunk.count(b"\n")
    return count
