"""A GGUF's config is parsed once per version of the file, not once per pre-run check (a parse reads the whole
vocabulary: about 3 s for SmolLM2, 18 s for Gemma 3 here)."""

import os
import shutil

import gguf

from quant_pipeline.core.paths import default_gguf_path
from quant_pipeline.models.checkpoint import read_model_config, resolve_model_source


def counting_parses(monkeypatch) -> list[str]:
    parses, original = [], gguf.GGUFReader

    class Counting(original):
        def __init__(self, path, *args, **kwargs):
            parses.append(str(path))
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    return parses


def test_a_gguf_config_is_parsed_once_per_version_of_the_file(tmp_path, monkeypatch):
    path = tmp_path / "model.gguf"
    shutil.copy(default_gguf_path(), path)
    source, parses = resolve_model_source(str(path)), counting_parses(monkeypatch)

    first = read_model_config(source)
    first["hidden_size"] = -1  # a caller's edit stays its own
    again = read_model_config(source)
    assert len(parses) == 1 and again["hidden_size"] == 576 and again["num_hidden_layers"] == 30

    # the same bytes written again, its mtime put back: the ctime moved, so it is another version, parsed again
    before = path.stat()
    path.write_bytes(path.read_bytes())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_mtime_ns == before.st_mtime_ns
    assert read_model_config(source) == again and len(parses) == 2
