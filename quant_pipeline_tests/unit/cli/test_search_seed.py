"""Where the accuracy-aware search starts: the candidate nearest to passing that can keep layer types."""

import math

from quant_pipeline.cli.candidates import search_seed


def table(*rows) -> dict:
    keys = ("candidate", "verdict", "worst_share", "size_bytes")
    return {"rows": [dict(zip(keys, r, strict=True)) for r in rows]}


def test_the_search_starts_from_the_failing_candidate_nearest_to_passing_whatever_its_method():
    t = table(
        ("identity", "PASS", 0.0, 500),
        ("gptq-w4-g64", "FAIL", 4.4, 160),
        ("torchao-int8-weight", "FAIL", 1.06, 210),
        ("torchao-int8-dynamic", "FAIL", 1.7, 210),
    )
    keys = [r["candidate"] for r in t["rows"]]
    assert search_seed(keys, t) == "torchao-int8-weight"
    assert search_seed(["gptq-w4-g64", "identity"], t) == "gptq-w4-g64"  # only what this audit named


def test_the_search_never_starts_from_identity_a_kept_variant_or_an_unmeasured_candidate():
    t = table(
        ("identity", "FAIL", 0.1, 500),
        ("torchao-int8-weight-xv_proj", "FAIL", 0.2, 220),
        ("gptq-w4-g64", "UNVERIFIED", 0.3, 160),
        ("torchao-int8-dynamic", "INCOMPLETE", math.nan, 210),
    )
    assert search_seed([r["candidate"] for r in t["rows"]], t) is None


def test_equal_shares_start_from_the_smaller_candidate():
    t = table(("torchao-int8-weight", "FAIL", math.inf, 210), ("gptq-w4-g64", "FAIL", math.inf, 160))
    assert search_seed(["torchao-int8-weight", "gptq-w4-g64"], t) == "gptq-w4-g64"


def test_an_hqq_candidate_can_seed_the_search_which_keeps_its_layer_types_under_its_own_key():
    from quant_pipeline.core.recipe import candidate_key, recipe_from_key

    t = table(("bnb-nf4", "FAIL", 1.5, 169), ("hqq-w4-g64", "FAIL", 1.2, 170), ("hqq-w4-g64-xv_proj", "FAIL", 0.9, 180))
    assert search_seed([r["candidate"] for r in t["rows"]], t) == "hqq-w4-g64"  # not the kept variant
    step = recipe_from_key("hqq-w4-g64").model_copy(update={"keep": "up_proj.v_proj"})  # what search_steps yields
    assert candidate_key(step) == "hqq-w4-g64-xup_proj.v_proj" and recipe_from_key(candidate_key(step)) == step
