"""What loading the pipeline's definitions costs every process that does it (the Dagster UI, the daemon, each
run's worker), scoring or not; and what MLflow pays when it loads a registered model's code (the serving package)
to check it, once per audit."""

import subprocess
import sys

import pytest

LOADED = [("quant_pipeline.definitions", "defs"), ("quant_pipeline.serving", "Server")]  # a module, a name it defines


@pytest.mark.parametrize(("module", "loaded"), LOADED)
def test_loading_the_definitions_or_the_served_models_code_leaves_jsonschema_and_its_iri_grammar_to_the_scorer(
    module, loaded
):
    code = (
        f"import sys, importlib; assert getattr(importlib.import_module({module!r}), {loaded!r}) is not None; "
        "print('LOADED', sorted(m for m in ('jsonschema', 'rfc3987_syntax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr[-2000:]
