"""The order test files are handed to pytest-xdist's workers in: the heaviest first.

`make test` runs one worker per core and keeps each file on one worker (`--dist loadfile`). By default xdist hands
out the files holding the most tests first, so the heaviest ones, which hold one test each (a real model audited
end to end, five to seven minutes), went last: on 2026-11-27 one worker idled for 650 s at the end while the other
ran the default model, a daemon test and Gemma one after another (pytest 1,934 s for 3,162 s of tests). Handing out
the longest files first (longest-processing-time-first scheduling) ends both workers together. `make test` passes
`--no-loadscope-reorder` so that xdist keeps this order.

The figures are each file's setup, call and teardown seconds summed (`--durations=0` in a fresh-clone CI run, two
workers on 2 cores, 2026-11-27, session 21: 2,128 s of tests in 1,084 s of pytest). They only order the queue: a
stale figure makes the run slower, never wrong. Files under 5 s are left out and keep their collection order after
these.
"""

FILE_SECONDS = {
    "e2e/test_default_model.py": 427,
    "e2e/test_beyond_one_machine.py": 298,
    "e2e/test_second_model.py": 263,
    "e2e/test_servers.py": 228,
    "e2e/test_methods.py": 157,
    "integration/models/test_architectures.py": 77,
    "integration/serving/test_serving.py": 68,
    "red_team/test_gate_attacks.py": 68,
    "e2e/test_live_rollback.py": 62,
    "e2e/test_reaudit.py": 55,
    "integration/test_model_identity.py": 44,
    "e2e/test_audit_pipeline.py": 41,
    "red_team/test_crash_attacks.py": 33,
    "browser/test_mlflow_ui.py": 32,
    "e2e/test_bad_input.py": 31,
    "e2e/test_signoff.py": 30,
    "browser/test_dagster_ui.py": 29,
    "unit/cli/test_main.py": 20,
    "red_team/test_evidence_attacks.py": 19,
    "red_team/test_bad_input_attacks.py": 18,
    "e2e/test_bench.py": 17,
    "integration/monitoring/test_live_monitoring.py": 15,
    "unit/defs/test_definitions_load.py": 14,
    "integration/monitoring/test_served_canary.py": 12,
    "integration/test_record_shown.py": 11,
    "integration/models/test_gguf_config.py": 9,
    "unit/core/test_store.py": 8,
    "unit/defs/test_resources.py": 7,
    "integration/serving/test_http_canary.py": 6,
    "integration/models/test_gptq.py": 6,
    "red_team/test_serving_attacks.py": 6,
}
PACKAGE = "quant_pipeline_tests/"


def file_seconds(nodeid: str) -> int:
    """The measured seconds of the file a test id lies in (0 for a file not measured as heavy)."""
    return FILE_SECONDS.get(nodeid.split("::", 1)[0].removeprefix(PACKAGE), 0)


def heaviest_files_first(items: list) -> list:
    """The collected items, whole files kept together, the heaviest files first; a stable sort, so the files not
    measured and the tests within each file keep their collection order."""
    return sorted(items, key=lambda item: -file_seconds(item.nodeid))
