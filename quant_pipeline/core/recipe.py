"""The quantization recipe: part of every artifact's identity, so it lives with the records."""

from __future__ import annotations

import dagster as dg

from quant_pipeline.core.errors import AuditInputError

# Each method and the recipe fields that determine its bytes: only those enter the artifact's ID and record,
# so changing a field a method ignores (GPTQ's damping for torchao int8) does not re-quantize or re-audit.
METHOD_FIELDS: dict[str, tuple[str, ...]] = {
    "gptq": ("bits", "group_size", "desc_act", "sym", "damp_percent", "calibration_samples", "seq_len", "keep"),
    "torchao-int8-weight": ("keep",),
    "torchao-int8-dynamic": ("keep",),
    "torchao-int4-weight": ("group_size", "keep"),
    "bnb-int8": ("keep",),
    "bnb-nf4": ("keep",),
    "hqq": ("bits", "group_size", "keep"),
    "identity": (),
}
CALIBRATED_METHODS = frozenset({"gptq"})  # the others are data-free: the calibration set is not an input
GROUPED_METHODS = frozenset({"gptq", "torchao-int4-weight", "hqq"})  # group_size splits each layer's input features
HQQ_BITS = (2, 3, 4, 8)  # HQQ's bit widths with a packed layout (its 1-bit one is not offered)
# The linear layers of a Llama-style block, by the name they have in every block (what `keep` may name).
LAYER_TYPES = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")


class Recipe(dg.Config):
    """How the base becomes the candidate: a method and its settings. The default is GPTQ 4-bit with
    group 64, which suits SmolLM2-135M (its hidden size 576 is not divisible by 128).

    `method`: gptq (gptqmodel, calibrated), torchao-int8-weight, torchao-int8-dynamic,
    torchao-int4-weight (torchao, data-free), bnb-int8, bnb-nf4 (bitsandbytes, data-free), hqq (HQQ, data-free:
    its bits and group size), or identity (the base copied: every delta must be zero)."""

    method: str = "gptq"
    bits: int = 4
    group_size: int = 64
    desc_act: bool = False
    sym: bool = True
    damp_percent: float = 0.1
    calibration_samples: int = 64
    seq_len: int = 256
    # Every method but identity: the layer types left at full precision in every block, `.`-joined in sorted
    # order (`down_proj.o_proj`): what the accuracy-aware search keeps when no candidate passes
    keep: str = ""

    @property
    def calibrated(self) -> bool:
        return self.method in CALIBRATED_METHODS

    def validate_values(self) -> None:
        if self.method not in METHOD_FIELDS:
            known = ", ".join(METHOD_FIELDS)
            raise AuditInputError(f"recipe.method={self.method!r} is not a known method: use one of {known}")
        if self.method in GROUPED_METHODS and self.group_size != -1 and self.group_size <= 0:
            raise AuditInputError(
                f"recipe.group_size={self.group_size}: use a positive group size (e.g. 64) or -1 for per-channel"
            )
        if self.method == "torchao-int4-weight" and self.group_size == -1:
            raise AuditInputError("recipe.group_size=-1: torchao-int4-weight needs a group size (e.g. 64)")
        if self.method == "hqq" and self.bits not in HQQ_BITS:
            raise AuditInputError(f"recipe.bits={self.bits} is not supported by HQQ: use 2, 3, 4 or 8")
        if self.method == "hqq" and self.group_size != -1 and self.group_size % 8:
            raise AuditInputError(f"recipe.group_size={self.group_size}: HQQ needs a multiple of 8 (e.g. 64) or -1")
        kept = self.keep.split(".") if self.keep else []
        if kept and "keep" not in METHOD_FIELDS[self.method]:
            raise AuditInputError(f"recipe.keep={self.keep!r}: {self.method} keeps no layer types; leave keep empty")
        if kept != sorted(set(kept)) or not all(k in LAYER_TYPES for k in kept) or len(kept) == len(LAYER_TYPES):
            raise AuditInputError(
                f"recipe.keep={self.keep!r}: name layer types to keep at full precision, sorted, `.`-joined, not all "
                f"of them ({', '.join(LAYER_TYPES)})"
            )
        if not self.calibrated:
            return
        if self.bits not in (2, 3, 4, 8):
            raise AuditInputError(f"recipe.bits={self.bits} is not supported by GPTQ: use 2, 3, 4 or 8")
        if not 0 < self.damp_percent < 1:
            raise AuditInputError(
                f"recipe.damp_percent={self.damp_percent}: must lie strictly between 0 and 1 (0.1 is usual)"
            )
        if self.calibration_samples < 1:
            raise AuditInputError(f"recipe.calibration_samples={self.calibration_samples}: need at least 1")
        if self.seq_len < 8:
            raise AuditInputError(f"recipe.seq_len={self.seq_len}: need at least 8 tokens per calibration sample")

    def as_dict(self) -> dict:
        """The method and the fields that determine its bytes (a GPTQ recipe that keeps nothing has the dict it
        always had, so existing GPTQ artifact IDs stand)."""
        fields = {f: getattr(self, f) for f in METHOD_FIELDS.get(self.method, ())}
        if not fields.get("keep"):
            fields.pop("keep", None)
        return {"method": self.method, **fields}


# A candidate's name is its recipe, written out: `gptq-w4-g64`, `gptq-w8-g64-n128`, `gptq-w4-g64-xdown_proj`
# (down_proj kept at full precision), `torchao-int8-weight`, `torchao-int8-weight-xv_proj`,
# `torchao-int4-weight-g32`, `hqq-w4-g64`, `identity`. It is the Dagster partition key, so a candidate added from the
# UI (a new partition) needs no code and no file: the key says everything. Fields a method does not use cannot
# appear; bits and group always do (GPTQ's, HQQ's), the others only when they differ from the default.
_CODES = {"bits": "w", "group_size": "g", "calibration_samples": "n", "seq_len": "l", "damp_percent": "d"}
_EXAMPLES = "e.g. gptq-w4-g64, gptq-w8-g64-n128, torchao-int8-weight, torchao-int4-weight-g64, hqq-w4-g64, identity"


def candidate_key(recipe: Recipe) -> str:
    """The canonical partition key of a recipe (the inverse of `recipe_from_key`)."""
    default, parts = Recipe(), [recipe.method]
    for field in METHOD_FIELDS[recipe.method]:
        value = getattr(recipe, field)
        if field == "group_size":
            parts.append("gchannel" if value == -1 else f"g{value}")
        elif field == "bits" or (field in _CODES and value != getattr(default, field)):
            parts.append(f"{_CODES[field]}{value}")
        elif field == "desc_act" and value:
            parts.append("act")
        elif field == "sym" and not value:
            parts.append("asym")
        elif field == "keep" and value:
            parts.append(f"x{value}")
    return "-".join(parts)


def _setting(method: str, token: str, key: str) -> tuple[str, object]:
    """One `-`-separated token of a candidate key as (field, value)."""
    flags = {"act": ("desc_act", True), "asym": ("sym", False), "gchannel": ("group_size", -1)}
    if token in flags:
        field, value = flags[token]
    elif token.startswith("x") and len(token) > 1 and not token[1].isdigit():  # x<types kept at full precision>
        field, value = "keep", token[1:]
    else:
        field = next((f for f, c in _CODES.items() if token.startswith(c)), "")
        raw = token[1:]
        if not field or not raw.replace(".", "", 1).isdigit():
            field = ""
        else:
            value = float(raw) if field == "damp_percent" else int(float(raw))
    if field not in METHOD_FIELDS[method]:
        raise AuditInputError(f"candidate {key!r}: {token!r} is not a setting of {method}; {_EXAMPLES}")
    return field, value


def recipe_from_key(key: str) -> Recipe:
    """The recipe a candidate key names; AuditInputError (one line, with the canonical spelling) otherwise."""
    method = max((m for m in METHOD_FIELDS if key == m or key.startswith(f"{m}-")), key=len, default=None)
    if method is None:
        raise AuditInputError(f"candidate {key!r}: no known method starts it ({', '.join(METHOD_FIELDS)}); {_EXAMPLES}")
    recipe = Recipe(method=method, **dict(_setting(method, t, key) for t in key[len(method) :].split("-") if t))
    try:
        recipe.validate_values()
    except AuditInputError as e:
        raise AuditInputError(f"candidate {key!r}: {e}") from None
    if candidate_key(recipe) != key:
        raise AuditInputError(f"candidate {key!r}: write it as {candidate_key(recipe)!r} (one name per recipe)")
    return recipe
