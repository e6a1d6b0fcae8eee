"""`quant-pipeline audit --candidates ...`: audit several candidates of one model, then compare them.

Each candidate is its own Dagster run of its own model x candidate partition (after a run of the model's own
stages, whose work is made once and reused by the others), so each keeps its history in the UI; the comparison
run that follows reads them all back, recommends one for sign-off and writes the model's audit report. Exit
codes: 0 a candidate is recommended (at least one quantized candidate PASSED), 3 none passed (every verdict is
recorded), 2 bad input, 1 a stage crashed, 130 interrupted (a signal stops the whole command, not only the
candidate it hit).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from quant_pipeline.core.errors import EXIT_BAD_INPUT, EXIT_CRASHED, EXIT_GATE_FAILED, EXIT_PASSED, AuditInputError
from quant_pipeline.core.recipe import METHOD_FIELDS, candidate_key, recipe_from_key
from quant_pipeline.defs.candidates import CANDIDATE_STAGES, COMPARISON_STAGES, MODEL_STAGES

EXIT_INTERRUPTED = 130  # the shell's code for a command stopped by a signal: nothing after it was audited

# `--candidates all` (what `make demo` runs): every method once, identity first (the pipeline's own check).
ALL_CANDIDATES = (
    "identity",
    "gptq-w4-g64",
    "torchao-int8-weight",
    "torchao-int8-dynamic",
    "torchao-int4-weight-g64",
    "bnb-int8",
    "bnb-nf4",
    "hqq-w4-g64",
)


def parse_candidates(text: str) -> list[str]:
    """The candidate keys named on the command line (`all` for every default one), each checked now."""
    keys = list(ALL_CANDIDATES) if text.strip() == "all" else [k.strip() for k in text.split(",") if k.strip()]
    if not keys:
        raise AuditInputError("--candidates is empty: name candidates, e.g. gptq-w4-g64,torchao-int8-weight, or all")
    for key in keys:
        recipe_from_key(key)  # one line naming the key and its canonical spelling, before any work
    return list(dict.fromkeys(keys))


def audit_candidates(
    overrides: dict, keys: list[str], verbose: bool = False, search: int = 0, seconds: dict | None = None
) -> int:
    """Audit each candidate in turn, then the tradeoff (and, with `search`, the accuracy-aware search when no
    quantized candidate passes); print one line per candidate and the table. `seconds` (the bench's) gets each
    candidate's wall seconds."""
    from quant_pipeline.cli.audit import audit_outcome, run_audit

    outcomes, start = {}, time.perf_counter()
    seconds = {} if seconds is None else seconds

    def audit(key: str, label: str) -> None:
        print(f"\n== {label}: {key}", flush=True)
        t0 = time.perf_counter()
        selection = [*MODEL_STAGES, *CANDIDATE_STAGES]  # the comparison runs once, after the last candidate
        outcome = audit_outcome(
            run_audit({**overrides, "recipe": recipe_from_key(key)}, selection=selection, verbose=verbose)
        )
        outcomes[key], seconds[key] = outcome, time.perf_counter() - t0
        print(f"{outcome.verdict.splitlines()[0]} ({seconds[key]:.0f} s)", flush=True)
        if "DagsterExecutionInterruptedError" in outcome.error:  # a person stopped the command, not this stage
            raise KeyboardInterrupt(key)
        if outcome.code not in (EXIT_PASSED, EXIT_GATE_FAILED):  # bad input or a crash: say so, go on
            print(f"quant-pipeline: {key}: {outcome.error}", flush=True)

    def tradeoff() -> tuple[dict, Path] | None:
        result = run_audit(overrides, selection=COMPARISON_STAGES, verbose=verbose)
        if not result.success:
            print("quant-pipeline: error: the tradeoff could not be built: see the Dagster run", result.run_id)
            return None
        out = Path(result.output_for_node("candidate_tradeoff")["path"])
        return json.loads((out / "tradeoff.json").read_text()), out

    try:
        for n, key in enumerate(keys, 1):
            audit(key, f"candidate {n}/{len(keys)}")
        built = tradeoff()
        steps = search_steps(overrides, keys, search, built[0]) if built and not built[0]["recommended"] else []
        for step, key in enumerate(steps):
            audit(key, f"search step {step + 1}/{search}: the most sensitive layer types kept at full precision")
            built = tradeoff()
            if built is None or built[0]["recommended"]:
                break
    except KeyboardInterrupt as stopped:
        print(f"quant-pipeline: interrupted during {stopped.args[0] if stopped.args else 'a run'}: "
              "no further candidate was audited", flush=True)  # fmt: skip
        return EXIT_INTERRUPTED
    if built is None:
        return EXIT_CRASHED
    table, out = built
    print("\n" + (out / "tradeoff.md").read_text())
    per = ", ".join(f"{k} {v:.0f}" for k, v in seconds.items())
    total = time.perf_counter() - start
    print(f"wall seconds per candidate (the first pays the shared base stages): {per}; all {total:.0f}")
    print(f"plot: {out / 'tradeoff.svg'}")
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


def search_seed(keys: list[str], table: dict) -> str | None:
    """The candidate the search starts from: of those audited that keep nothing and can keep layer types, the
    one nearest to passing (smallest worst share of tolerance, then the smaller), as the tradeoff measured it."""
    rows = {r["candidate"]: r for r in table["rows"]}
    keepable = [
        k for k in keys
        if k in rows and "keep" in METHOD_FIELDS[(r := recipe_from_key(k)).method] and not r.keep
        and rows[k]["verdict"] in ("FAIL", "INCOMPLETE") and rows[k]["worst_share"] == rows[k]["worst_share"]
    ]  # fmt: skip
    return min(keepable, key=lambda k: (rows[k]["worst_share"], rows[k]["size_bytes"]), default=None)


def search_steps(overrides: dict, keys: list[str], budget: int, table: dict):
    """The search's candidates, one per step: the candidate nearest to passing (`search_seed`), keeping its 1,
    2, ... most sensitive layer types (as its own record measured them) at full precision, up to `budget`."""
    from quant_pipeline.cli.audit import _instance
    from quant_pipeline.core.artifacts import read_artifact_record
    from quant_pipeline.defs.candidates import model_key
    from quant_pipeline.defs.resources import build_resources
    from quant_pipeline.defs.tradeoff import current_artifact
    from quant_pipeline.models.sensitivity import most_sensitive

    settings = build_resources(**overrides)["settings"]
    seed = search_seed(keys, table)
    aid = current_artifact(_instance(), model_key(settings.model), seed) if seed else None
    if aid is None:
        print("search: no quantized candidate that could keep layer types was judged (add gptq-w4-g64)", flush=True)
        return
    sensitivity = read_artifact_record(settings.store, aid).layer_sensitivity
    if not sensitivity:
        print(f"search: {aid} records no layer sensitivity (made by an older version): re-audit {seed}", flush=True)
        return
    ranked = ", ".join(f"{k} {v:.2e}" for k, v in sorted(sensitivity.items(), key=lambda kv: -kv[1]))
    print(f"\nsearch from {seed} (nearest to passing); layer types by sensitivity: {ranked}", flush=True)
    seed_recipe = recipe_from_key(seed)
    for n in range(1, min(budget, len(sensitivity) - 1) + 1):
        yield candidate_key(seed_recipe.model_copy(update={"keep": most_sensitive(sensitivity, n)}))
