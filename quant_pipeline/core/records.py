"""Typed records: what the pipeline writes about an artifact, an evaluation, a verdict, a request.

Records are validated when they are read, so a hand-edited or truncated file is refused with its
path and the field at fault instead of surfacing later as a KeyError. Each carries a
`schema_version`; a reader refuses versions it does not know rather than guessing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import tree_hash
from quant_pipeline.core.store import write_json_atomic

SCHEMA_VERSION = 1
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
# MLflow hands registry versions back as int or str depending on the call: one spelling on disk.
Version = Annotated[str | None, BeforeValidator(lambda v: None if v is None else str(v))]


class RecordError(AuditInputError):
    """A record on disk that cannot be read as what it claims to be."""


def read_yaml(path: Path, error: type[Exception], fix: str = "") -> object:
    """A YAML file's content (None when empty), or `error` in one line naming the file, the line and the
    problem: every policy and config file of the project is read this way."""
    import yaml

    tail = f"; {fix}" if fix else ""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise error(f"{path}: not UTF-8 text{tail}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise error(f"{path}{where}: not valid YAML ({getattr(e, 'problem', e)}){tail}") from None


def read_yaml_mapping(
    path: Path, error: type[Exception], what: str, how: str, shape: str, fix: str = "", empty_ok: bool = False
) -> dict | None:
    """The mapping a policy or config file holds, or `error` in one line: the file is missing (`what` it is,
    `how` to name one), is not YAML, or holds something other than a mapping (`shape`: what it should hold).
    An empty file is None where `empty_ok` (every field defaulted). Every policy and config loader starts here."""
    if not path.is_file():
        raise error(f"{what} {path} does not exist: {how}")
    raw = read_yaml(path, error, fix)
    if raw is None and empty_ok:
        return None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a mapping {shape}" + (f"; {fix}" if fix else ""))
    return raw


def first_error(error: ValidationError) -> tuple[str, str]:
    """(dotted field, message) of a validation error's first problem: what a one-line refusal names. A rule
    that names its field itself (`ctx.field`) is named by it, since pydantic's location is then only the
    enclosing mapping; a mapping key's `[key]` marker is dropped from the location."""
    first = error.errors()[0]
    field = (first.get("ctx") or {}).get("field")
    return field or ".".join(str(p) for p in first["loc"] if p != "[key]") or "(top level)", first["msg"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schema_version: int = SCHEMA_VERSION

    @model_validator(mode="after")
    def _known_schema(self) -> Self:
        if self.schema_version != SCHEMA_VERSION:
            raise ValueError(
                f"schema_version {self.schema_version} is not {SCHEMA_VERSION}: written by another version"
            )
        return self

    @classmethod
    def parse(cls, data: object, source: str = "record") -> Self:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            where, msg = first_error(e)
            raise RecordError(
                f"{source}: field `{where}`: {msg}; restore the file from the run that wrote it"
            ) from None

    @classmethod
    def read(cls, path: Path) -> Self:
        path = Path(path)
        if not path.is_file():
            raise RecordError(f"{path}: no {cls.__name__} here")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise RecordError(f"{path}: not valid JSON ({e}); restore the file from the run that wrote it") from None
        return cls.parse(data, str(path))

    def write(self, path: Path) -> Path:
        return write_json_atomic(path, self.dump())

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ScaleSummary(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hash: str
    layers: int
    per_layer: dict[str, dict[str, dict[str, float]]] = {}


class SliceRef(BaseModel):
    """One slice × metric of a delta report (the unit a verdict is given on)."""

    model_config = ConfigDict(extra="forbid")
    category: str
    metric: str


class SliceNote(SliceRef):
    """A slice x metric that did not count as a pass or a failure, and why (not measurable, uninformative, waived)."""

    status: str
    reason: str


class TreeRecord(Record):
    """A record of a folder: its per-file hashes must add up to the tree hash it records."""

    DIGEST_FIELD: ClassVar[str]
    files: dict[str, Sha256]

    @model_validator(mode="after")
    def _files_add_up(self) -> Self:
        if tree_hash(self.files) != getattr(self, self.DIGEST_FIELD):
            raise ValueError(f"per-file hashes do not add up to {self.DIGEST_FIELD}")
        return self


class CheckpointRecord(TreeRecord):
    """Written beside a checkpoint the pipeline converted (GGUF, hub): where it came from, its files."""

    DIGEST_FIELD = "hash"
    source: dict[str, Any]
    hash: Sha256


class Architecture(BaseModel):
    """What a model's name stands for (its base's family, widths, depth): recorded in its trail's audit entries."""

    model_config = ConfigDict(extra="forbid")
    model_type: str
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None

    def describe(self) -> str:
        return f"{self.model_type} ({', '.join(f'{k}={v}' for k, v in self.model_dump().items() if k != 'model_type')})"


class ArtifactRecord(TreeRecord):
    """A quantized artifact: every input that determined its bytes, and the bytes' hashes."""

    DIGEST_FIELD = "content_hash"
    artifact_id: str
    model_name: str
    dagster_run_id: str | None = None
    # the inputs its ID is derived from
    base_hash: Sha256
    base_path: str
    recipe: dict[str, Any]
    # the samples the recipe read, tokenized as it read them (models.calibration.used_samples_hash); None: a
    # data-free method, the calibration set is not an input. The file they came from: calibration_file_hash.
    calibration_hash: Sha256 | None
    calibration_file_hash: Sha256 | None = None
    calibration_count: int  # (the runtime is an input too: a kernel or library change is a different artifact)
    runtime_hash: Sha256
    runtime: dict[str, Any]
    precision: str  # the bytes, from here on
    # relative output error of each layer type under the method's rounding, on calibration text (models.sensitivity):
    # why a `keep` recipe kept what it kept; the calibration file it was measured on (chose nothing in data-free bytes)
    layer_sensitivity: dict[str, float] = {}
    sensitivity_calibration_hash: Sha256 | None = None
    scales: ScaleSummary
    content_hash: Sha256
    size_bytes: int


class EvalRecord(Record):
    """One evaluation of one checkpoint under one suite and runtime (reused while the key matches)."""

    key: str
    label: Literal["base", "quantized"]
    dagster_run_id: str
    # what was evaluated: the key is a hash of these
    model_hash: Sha256
    suite_hash: Sha256
    runtime_hash: Sha256
    limit: int | None
    # throughput of the harness part
    eval_seconds: float
    eval_tokens: int
    eval_tokens_per_second: float
    # cost as served: latency probe and generation memory
    latency_p50_s: float
    latency_p95_s: float
    latency_p99_s: float
    latency_requests: int
    tokens_per_second: float
    generation_peak_rss_mb: float
    part_seconds: dict[str, float]
    # how the model ran (kernels, dtype, decode loop, batch sizes: see evaluation.generation.execution)
    execution: dict[str, str | int] = {}
    # the base run writes the reference states; a quantized run names the ones it was measured against
    reference_sha256: Sha256 | None = None
    agreement_reference_sha256: Sha256 | None = None


class DeltaReportRecord(Record):
    """The verdict of one artifact under one policy on one evaluation (the three key its folder)."""

    artifact_id: str
    model_name: str
    registry_version: Version
    policy_path: str
    policy_hash: Sha256
    policy_name: str
    allow_override: bool
    # the evaluations judged: the quantized one's key names the base's too
    base_eval_key: str
    eval_key: str
    verdict: Literal["PASS", "FAIL", "INCOMPLETE"]
    passed: bool  # verdict == PASS: the one verdict that can be approved
    reasons: list[str]  # why the verdict is not PASS, one line each
    failing: list[SliceRef]
    incomplete: list[SliceNote]
    waived: list[SliceNote]
    measured_metrics: list[str]
    policy_metrics: list[str]
    categories: list[str]
    path: str
    markdown_path: str
    html_path: str

    @model_validator(mode="after")
    def _verdict_consistent(self) -> Self:
        if self.passed != (self.verdict == "PASS") or (self.verdict == "FAIL") != bool(self.failing):
            raise ValueError(f"verdict {self.verdict} disagrees with passed/failing")
        return self


TrailEvent = Literal[
    "audit",
    "policy pinned",
    "evaluated",
    "approved",
    "rejected",
    "incomplete",
    "pending sign-off",
    "revoked",
    "promoted",
    "rollback",
]


class TrailEntry(BaseModel):
    """One hash-chained entry of a model's trail; event-specific fields ride along (the hash covers them)."""

    model_config = ConfigDict(extra="allow")
    event: str | None = None  # every pipeline entry has one; the chain itself does not need it
    seq: int
    prev_hash: str
    hash: str
    at: str
    artifact_id: str | None = None
    registry_version: Version = None
    schema_version: Literal[1] = 1  # entries written before the field existed read as version 1


class Decision(BaseModel):
    """A sign-off decision as it is appended to the trail."""

    model_config = ConfigDict(extra="forbid")
    event: Literal["approved", "rejected", "incomplete", "pending sign-off", "revoked"]
    artifact_id: str
    registry_version: Version
    by: str | None
    note: str = ""
    # an approval's evidence: the bytes and the policy it was judged on; an override names two people
    content_hash: Sha256 | None = None
    policy_hash: Sha256 | None = None
    report_sha256: Sha256 | None = None  # the exact delta report an approval rests on
    override: bool = False
    second_approver: str | None = None
    dagster_run_id: str | None = None


RequestStatus = Literal["ok", "error", "busy", "over_budget", "timeout"]
Arm = Literal["production", "canary", "base"]


class OutputValidation(BaseModel):
    """A structured-output check of one answer, by the behaviour suite's own validator (schema or tool call)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["schema", "tool"]
    valid: bool
    error: str | None = None


class RequestBudget(BaseModel):
    """The per-request token budgets a request was held to."""

    model_config = ConfigDict(extra="forbid")
    max_prompt_tokens: int
    max_new_tokens: int


class ShadowOutcome(BaseModel):
    """The canary's answer to a request production answered (shadow mode): never sent to the client, logged
    beside production's so the two can be compared on live traffic. `error` says why a shadow run failed
    (the canary refused, or it raised); the output fields are then null."""

    model_config = ConfigDict(extra="forbid")
    arm: Literal["canary"] = "canary"
    model_version: Version = None
    artifact_id: str | None = None
    content_hash: str | None = None
    output: str | None = None
    output_ids: list[int] | None = None
    identical: bool | None = None  # the same token ids as production's answer
    prefix_agreement: Annotated[float, Field(ge=0, le=1)] | None = None  # shared prefix / longer output
    latency_s: float | None = None
    refused: bool | None = None
    validation: OutputValidation | None = None
    error: str | None = None


class RequestLogEntry(BaseModel):
    """One request: what was asked, which exact bytes answered (or why none did), how, and how long it took.

    Entries written before canary routing, budgets and backpressure existed lack the newer fields and
    read with their defaults. `arm` is null when the request never reached routing (busy, over budget,
    timed out while queued)."""

    model_config = ConfigDict(extra="allow")
    request_id: str
    time: str
    model_name: str
    ref: str
    status: RequestStatus
    prompt: str | None = None
    prompt_logged: bool = True
    prompt_sha256: str
    decoding: dict[str, Any]
    arm: Arm | None = None
    arm_reason: str | None = None
    arm_bucket: float | None = None  # the request ID's bucket, where a canary split was asked
    fallback: bool = False  # the routing chose an arm that could not serve; another answered
    fallback_reason: str | None = None
    canary_changed: str | None = None  # the canary alias moved since the last request ("v3->v5", "v5->none")
    error: str | None = None  # why a request was not answered
    model_version: Version = None
    artifact_id: str | None = None
    content_hash: str | None = None
    output: str | None = None
    output_ids: list[int] | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    latency_s: float | None = None
    generate_s: float | None = None
    refused: bool = False  # the answer opens with a refusal (evaluation.behaviour.is_refusal)
    validation: OutputValidation | None = None
    shadow: ShadowOutcome | None = None
    budget: RequestBudget | None = None
    schema_version: Literal[1] = 1  # entries written before the field existed read as version 1

    @classmethod
    def parse_line(cls, data: object, source: str) -> RequestLogEntry:
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            where, msg = first_error(e)
            raise RecordError(f"{source}: field `{where}`: {msg}: the request log was altered") from None
