"""What loading the pipeline's definitions costs every process that does it (the Dagster UI, the daemon, each
run's worker), scoring or not; and what MLflow pays when it loads a registered model's code (the serving package)
to check it, once per audit."""

import subprocess
import sys

import pytest


@pytest.mark.parametrize("module", ["quant_pipeline.definitions", "quant_pipeline.serving"])
def test_loading_the_definitions_or_the_served_models_code_leaves_jsonschema_and_its_iri_grammar_to_the_scorer(
    module,
):
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "print('LOADED', sorted(m for m in ('jsonschema', 'rfc3987_syntax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr[-2000:]
