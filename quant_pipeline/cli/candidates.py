"""`quant-pipeline audit --candidates ...`: audit several candidates of one model, then compare them.

Each candidate is its own Dagster run of its own partition (the base checkpoint and the base evaluation
are made once and reused by the others), so each keeps its history in the UI; the tradeoff run that
follows reads them all back and recommends one for sign-off. Exit codes: 0 a candidate is recommended
(at least one quantized candidate PASSED), 3 none passed (every verdict is recorded), 2 bad input, 1 a
stage crashed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quant_pipeline.core.errors import EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_GATE_FAILED, EXIT_PASSED, AuditInputError
from quant_pipeline.core.recipe import recipe_from_key

# `--candidates all` (what `make demo` runs): every method once, identity first (the pipeline's own check).
ALL_CANDIDATES = (
    "identity",
    "gptq-w4-g64",
    "torchao-int8-weight",
    "torchao-int8-dynamic",
    "torchao-int4-weight-g64",
)


def parse_candidates(text: str) -> list[str]:
    """The candidate keys named on the command line (`all` for every default one), each checked now."""
    keys = list(ALL_CANDIDATES) if text.strip() == "all" else [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise AuditInputError("--candidates is empty: name candidates, e.g. gptq-w4-g64,torchao-int8-weight, or all")
    for key in keys:
        recipe_from_key(key)  # one line naming the key and its canonical spelling, before any work
    return list(dict.fromkeys(keys))


def audit_candidates(overrides: dict, keys: list[str], verbose: bool = False) -> int:
    """Audit each candidate in turn, then the tradeoff; print one line per candidate and the table."""
    from quant_pipeline.cli.audit import audit_outcome, run_audit

    outcomes, seconds, start = {}, {}, time.perf_counter()
    for n, key in enumerate(keys, 1):
        print(f"\n== candidate {n}/{len(keys)}: {key}", flush=True)
        t0 = time.perf_counter()
        outcome = audit_outcome(run_audit({**overrides, "recipe": recipe_from_key(key)}, verbose=verbose))
        outcomes[key], seconds[key] = outcome, time.perf_counter() - t0
        print(f"{outcome.verdict.splitlines()[0]} ({seconds[key]:.0f} s)", flush=True)
        if outcome.code not in (EXIT_PASSED, EXIT_GATE_FAILED):  # bad input or a crash: say so, go on
            print(f"quant-pipeline: {key}: {outcome.error}", flush=True)
    result = run_audit(overrides, selection=["candidate_tradeoff"], verbose=verbose)
    if not result.success:
        print("quant-pipeline: error: the tradeoff could not be built: see the Dagster run", result.run_id)
        return EXIT_CRASHED
    out = Path(result.output_for_node("candidate_tradeoff")["path"])
    table = json.loads((out / "tradeoff.json").read_text())
    print("\n" + (out / "tradeoff.md").read_text())
    per = ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    total = time.perf_counter() - start
    print(f"wall seconds per candidate (the first pays the shared base stages): {per}; all {total:.0f}")
    print(f"plot: {out / 'tradeoff.png'}")
    if table["skipped"]:
        print("not compared: " + "; ".join(table["skipped"]))
    if table["recommended_artifact"]:
        print(
            f"\nrecommended: {table['why']}\nsign off: quant-pipeline approve {table['recommended_artifact']} "
            "--by NAME --note WHY"
        )
    for code in (EXIT_CRASHED, EXIT_BAD_INPUT):  # a candidate that could not be judged outranks the answer
        if any(o.code == code for o in outcomes.values()):
            return code
    return EXIT_PASSED if table["recommended_artifact"] else EXIT_GATE_FAILED
