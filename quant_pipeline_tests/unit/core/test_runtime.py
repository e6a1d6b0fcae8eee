"""The runtime fingerprint: what changes numerics, and how a change is named."""

import json

from quant_pipeline.core.runtime import fingerprint_changes, fingerprint_hash, runtime_fingerprint


def test_runtime_fingerprint_names_libraries_and_cpu_and_reports_changes():
    fp = runtime_fingerprint()
    for lib in ("torch", "transformers", "optimum", "gptqmodel", "lm_eval"):
        assert fp["libraries"][lib] != "not installed", lib
    assert fp["cpu"]["model"] and isinstance(fp["cpu"]["isa"], list)
    older = json.loads(json.dumps(fp))
    older["libraries"]["torch"] = "2.12.0"
    assert fingerprint_hash(older) != fingerprint_hash(fp)
    assert fingerprint_changes(older, fp) == [f"libraries.torch: 2.12.0 -> {fp['libraries']['torch']}"]
