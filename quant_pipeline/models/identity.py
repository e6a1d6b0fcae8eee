"""Which registered model a checkpoint is: its name, and the architecture its name stands for.

A registered model (its versions, aliases, trail, reports) used to be named after the checkpoint's folder, so
two different models in folders both called `final` became versions of one model with one trail. The name is
now explicit (`AuditSettings.model_name`, QP_MODEL_NAME) or read from the checkpoint's own metadata (a hub id
in config.json's `_name_or_path`, a GGUF's `general.name`), the folder's name only where neither says; and a
checkpoint whose architecture differs from the one its name's trail recorded is refused unless it is declared
a new base version: a name then always stands for one kind of model, and a mix-up is a one-line refusal
before any work, not a trail that quietly mixes two models' verdicts.
"""

from __future__ import annotations

import functools
import re
import struct
from pathlib import Path

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.records import Architecture
from quant_pipeline.core.store import NAME_PATTERN

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# config keys of each architecture field, as the model families spell them (Llama's, GPT-2's, OPT's)
_FIELDS = {
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "intermediate_size": ("intermediate_size", "n_inner", "ffn_dim"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "num_key_value_heads": ("num_key_value_heads",),
}
NEW_BASE_FIX = "set QP_NEW_BASE_VERSION=1 (new_base_version=True) if it is a new base version of the same model"


def safe_name(text: object) -> str | None:
    """`text` as a registered model's name (runs of other characters become '-'), or None if nothing is left."""
    if not isinstance(text, str):
        return None
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text.strip()).strip("-._").replace("..", ".")[:128]
    return name if NAME_PATTERN.fullmatch(name or "-") else None


def name_from_config(config: dict) -> str | None:
    """A hub id in config.json's `_name_or_path` (`Qwen/Qwen2-0.5B` -> `Qwen--Qwen2-0.5B`, as a hub source is
    named). A local path there says no more than the folder does, so it names nothing."""
    value = config.get("_name_or_path")
    if not isinstance(value, str) or not HUB_ID.match(value) or Path(value).expanduser().exists():
        return None
    return safe_name(value.replace("/", "--"))


def file_version(path: Path) -> tuple[int, int, int, int]:
    """What a per-process cache of a file's contents is keyed on: inode, size, mtime and ctime. A rewrite changes
    the ctime even where it puts the size and mtime back (`os.utime` cannot set a ctime)."""
    stat = Path(path).stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def gguf_name(path: Path) -> str | None:
    """The GGUF's own `general.name`, read from the header's key-value pairs up to that key. gguf's reader parses
    every field first, the tokenizer's vocabulary included (262k strings, tens of seconds for Gemma 3), and the
    name is asked for by every stage's pre-run check."""
    try:
        value = _gguf_header_string(str(path), file_version(path), "general.name")
        return safe_name(value) if value is not None else None
    except (OSError, ValueError, UnicodeDecodeError, struct.error):
        return None


# GGUF value types (gguf-py's GGUFValueType) by their fixed byte size; 8 is a string, 9 an array
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


@functools.lru_cache(maxsize=64)
def _gguf_header_string(path: str, version: tuple, wanted: str) -> str | None:
    """A string value of a GGUF's header (None if absent); cached per `file_version`."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        _version, _tensors, pairs = struct.unpack("<IQQ", f.read(20))

        def text() -> str:
            (length,) = struct.unpack("<Q", f.read(8))
            return f.read(length).decode("utf-8")

        def skip(kind: int) -> None:
            if kind == 8:
                f.seek(struct.unpack("<Q", f.read(8))[0], 1)
            elif kind == 9:
                inner, count = struct.unpack("<IQ", f.read(12))
                if inner in _SCALAR_SIZES:
                    f.seek(_SCALAR_SIZES[inner] * count, 1)
                else:
                    for _ in range(count):
                        skip(inner)
            else:
                f.seek(_SCALAR_SIZES[kind], 1)

        for _ in range(pairs):
            key = text()
            (kind,) = struct.unpack("<I", f.read(4))
            if key == wanted and kind == 8:
                return text()
            skip(kind)
    return None


def architecture_of(config: dict) -> Architecture:
    """What a model name stands for: its family and its widths and depth (a text model's, for a
    multimodal config), read from the config without loading a weight."""
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    merged = {**config, **text}
    values = {
        field: next((merged[k] for k in keys if isinstance(merged.get(k), int)), None)
        for field, keys in _FIELDS.items()
    }
    return Architecture(model_type=str(merged.get("model_type") or "?"), **values)


def check_same_architecture(
    model_name: str, previous: Architecture | None, config: dict, new_base_version: bool
) -> None:
    """Refuse, in one line, a checkpoint whose architecture differs from the one its name last stood for
    (`previous`: what the model's trail recorded, `release.governing.base_architecture`)."""
    current = architecture_of(config)
    if previous is None or previous == current or new_base_version:
        return
    raise AuditInputError(
        f"model {model_name}: its previous base versions are {previous.describe()}, this checkpoint is "
        f"{current.describe()}: a different model under the same name; set a distinct model name "
        f"(QP_MODEL_NAME / model_name), or {NEW_BASE_FIX}"
    )
