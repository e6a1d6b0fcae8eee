"""Who and what an audit document is about: the identity a reviewer needs to accept a report as evidence.

A delta table alone does not say which model was judged, on which bytes, by which rule, or who decided:
a reviewer handed only the HTML must be able to answer all four. This record carries exactly that, typed
and validated like the pipeline's other records (full sha256 hashes, a known verdict), so a report
cannot be rendered with a truncated hash or a verdict the gate never gives.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from quant_pipeline.core.records import Sha256, Version
from quant_pipeline.evaluation.policy import Policy

PENDING = "pending sign-off"


class DecisionNote(BaseModel):
    """One sign-off decision as the trail records it: what, who, when, why."""

    model_config = ConfigDict(extra="ignore")
    event: str  # approved, rejected, incomplete, pending sign-off, revoked
    by: str | None = None
    at: str | None = None
    note: str = ""
    override: bool = False
    second_approver: str | None = None


class CostPoint(BaseModel):
    """One model on the cost-vs-quality plot (NaN where a quantity was not measured)."""

    name: str
    size_mb: float
    latency_s: float
    quality: float


class ReportContext(BaseModel):
    """The identity of one judged evaluation: the model, the artifact's bytes and inputs, the policy, the
    verdict, and the decisions that followed (none yet: pending sign-off)."""

    model_config = ConfigDict(extra="forbid")
    model_name: str
    artifact_id: str
    registry_version: Version = None  # MLflow hands it back as int or str
    content_hash: Sha256 | None  # None only for a trail written before audits recorded it
    base_hash: Sha256 | None
    recipe: dict[str, Any]
    calibration_hash: Sha256 | None  # None: a data-free method, no calibration set went into the bytes
    calibration_count: int | None = None
    runtime_hash: Sha256 | None
    policy_name: str
    policy_hash: Sha256
    policy: Policy | None = None  # the tolerances themselves; None when the pinned copy cannot be read back
    base_eval_key: str | None = None
    eval_key: str | None = None
    placement: str | None = None  # where both evaluations ran (device, compute dtype); None: not known here
    judged_at: str
    verdict: Literal["PASS", "FAIL", "INCOMPLETE"]
    reasons: list[str] = []
    decisions: list[DecisionNote] = []

    @property
    def decision(self) -> str:
        """The standing decision in one line: the last one recorded, or pending sign-off."""
        standing = [d for d in self.decisions if d.event != PENDING]
        if not standing:
            return PENDING
        d = standing[-1]
        who = d.by + (f" with {d.second_approver} (override)" if d.second_approver else "") if d.by else "unknown"
        return f"{d.event} by {who} at {d.at or 'an unrecorded time'}" + (f": {d.note}" if d.note else "")
