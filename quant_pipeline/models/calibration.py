"""The calibration set: the texts GPTQ uses to estimate each layer's input statistics.

Calibration data shapes the rounding error as much as the recipe does, so it is an audited input:
validated line by line, hashed, and summarised in tokens of the model being quantized. What determines a
calibrated artifact's bytes is not the file but the samples its recipe reads, tokenized as it tokenizes them:
so that (`used_samples_hash`) is the calibration's part of an artifact's ID, and the file's hash is recorded
beside it. Editing a line no recipe reads then re-quantizes nothing and asks for no new sign-off.
"""

import io
import json
import re
import statistics
from pathlib import Path

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import canonical_hash, sha256_file, sha256_text
from quant_pipeline.core.recipe import Recipe


def load_calibration_texts(path: Path) -> list[str]:
    """Read JSONL (objects with a non-empty string `text`) or plain text (one sample per line)."""
    if not path.is_file():
        raise AuditInputError(
            f"calibration file {path} does not exist: set settings.calibration_file (QP_CALIBRATION_FILE)"
        )
    texts: list[str] = []
    jsonl = path.suffix in (".jsonl", ".json")
    with io.StringIO(_read_text(path), newline=None) as f:  # newline=None: \r\n and \r read as \n, as open() does
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if not jsonl:
                texts.append(line.rstrip("\n"))
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise AuditInputError(
                    f'{path}:{lineno}: not valid JSON ({e.msg}): each line must be an object like {{"text": "..."}}'
                ) from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise AuditInputError(
                    f"{path}:{lineno}: field `text` is missing or empty: each line needs a non-empty string `text`"
                )
            texts.append(text)
    if not texts:
        raise AuditInputError(
            f"calibration file {path} is empty: add samples (JSONL with a `text` field, or one sample per line)"
        )
    return texts


def _read_text(path: Path) -> str:
    """The file as text, or one line naming the first byte that makes it binary.

    A binary file (a tarball, a parquet or pickle given by mistake, NUL-padded output) would
    otherwise end in a UnicodeDecodeError traceback, or worse, decode and be quantized against.
    """
    data = path.read_bytes()
    bad, what = data.find(b"\0"), "contains a NUL byte"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        if bad < 0 or e.start < bad:
            bad, what = e.start, f"byte 0x{data[e.start]:02x} is not UTF-8"
    else:
        if bad < 0:
            return text
    lineno = data.count(b"\n", 0, bad) + 1
    raise AuditInputError(
        f"{path}:{lineno}: not UTF-8 text ({what}; is it a binary or compressed file?): calibration data must be "
        "UTF-8 text, JSONL objects with a `text` field or one sample per line; convert or re-export it"
    )


def check_enough_samples(texts: list[str], path: Path, recipe: Recipe) -> None:
    if recipe.calibrated and len(texts) < recipe.calibration_samples:  # a data-free method reads none
        raise AuditInputError(
            f"calibration file {path} has {len(texts)} samples but recipe.calibration_samples is "
            f"{recipe.calibration_samples}: add samples or lower calibration_samples"
        )


def calibration_version(path: Path) -> str:
    """`file@hash`: what the calibration sensor compares between ticks."""
    return f"{path.name}@{sha256_file(path)[:16]}"


def token_stats(texts: list[str], tokenizer, seq_len: int) -> dict:
    lengths = [len(ids) for ids in tokenizer(texts)["input_ids"]]
    return {
        "tokens_total": sum(lengths),
        "tokens_min": min(lengths),
        "tokens_mean": round(statistics.fmean(lengths), 1),
        "tokens_max": max(lengths),
        "samples_truncated": sum(n > seq_len for n in lengths),
    }


# the files of a checkpoint that decide how text becomes token ids
TOKENIZER_FILES = re.compile(r"tokenizer[^/]*|special_tokens_map\.json|added_tokens\.json|vocab\.json|merges\.txt")


def tokenizer_hash(files: dict[str, str]) -> str:
    """The tokenizer's content hash, from a checkpoint's per-file hashes (its tokenizing files only)."""
    return canonical_hash({name: digest for name, digest in files.items() if TOKENIZER_FILES.fullmatch(name)})


def tokenizer_hash_of(folder: Path) -> str:
    """`tokenizer_hash` of a checkpoint folder, hashing its tokenizing files only (not its weights)."""
    return tokenizer_hash({p.name: sha256_file(p) for p in Path(folder).iterdir() if TOKENIZER_FILES.fullmatch(p.name)})


def used_samples_hash(texts: list[str], recipe: Recipe, tokenizer_sha256: str) -> str:
    """The calibration's identity for a calibrated recipe: the samples it reads (the first
    `calibration_samples`), their count, the sequence length they are cut to and the tokenizer that cuts them.
    Lines after those, and the file's layout, are not in it: they do not reach the bytes."""
    used = texts[: recipe.calibration_samples]
    samples = [sha256_text(text) for text in used]
    return canonical_hash(
        {"samples": samples, "count": len(used), "seq_len": recipe.seq_len, "tokenizer": tokenizer_sha256}
    )
