"""What loading the pipeline's definitions costs every process that does it (the Dagster UI, the daemon, each
run's worker), scoring or not."""

import subprocess
import sys


def test_loading_the_definitions_leaves_jsonschema_and_its_iri_grammar_to_the_scorer():
    code = (
        "import sys; import quant_pipeline.definitions as d; assert d.defs is not None; "
        "print('LOADED', sorted(m for m in ('jsonschema', 'rfc3987_syntax') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert "LOADED []" in out.stdout, out.stdout + out.stderr[-2000:]
