"""The evaluation suite on real model outputs with known answers: self-agreement, damage, gating."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.core.hashing import sha256_file
from quant_pipeline.evaluation.delta import NOT_MEASURABLE, REGRESSION, WITHIN, compute_deltas, verdict
from quant_pipeline.evaluation.delta_html import render_html, render_markdown
from quant_pipeline.evaluation.generation import agreement_with_reference, latency_probe, reference_states
from quant_pipeline.evaluation.policy import Policy
from quant_pipeline.evaluation.report_context import ReportContext
from quant_pipeline.evaluation.statistics import paired_bootstrap_ci
from quant_pipeline.evaluation.suite import (
    AGREEMENT_METRICS,
    add_agreement,
    aggregate_items,
    load_reference,
    run_harness,
    run_suite,
    with_reference,
)
from quant_pipeline.models.checkpoint import load_model

LIMIT, MAX_NEW = 3, 8
AGREEMENT_POLICY = Policy.model_validate({
    "name": "agreement", "min_items": 1,
    "tolerances": {
        "top1_agreement": {"direction": "higher_is_better", "tolerance": 0.05},
        # a random model is near-uniform: small KL
        "kl_divergence": {"direction": "lower_is_better", "tolerance": 0.01},
    },
})  # fmt: skip


@pytest.fixture(scope="module")
def tiny_suite(tiny_llama):
    """The tiny model's suite results, once per module (it is the slow part)."""
    model, tokenizer = load_model(tiny_llama)
    results, items, stats = run_suite(model, tokenizer, "base", limit=LIMIT, batch_size=4, max_new_tokens=MAX_NEW)
    return model, tokenizer, results, items, stats


def with_agreement(results, items, base_items, base_model, other_model, tokenizer, label):
    base_items, reference = with_reference(base_items, base_model, tokenizer, batch_size=4)
    items = add_agreement(
        items.assign(model=label), base_items, reference, base_model.get_output_embeddings(), other_model, batch_size=4
    )
    agree = pd.DataFrame(aggregate_items(items[["task", "category", *AGREEMENT_METRICS]].assign(model=label), label))
    return pd.concat([results.assign(model=label), agree], ignore_index=True), items


def noise_damaged(path, scale: float, seed: int):
    """A copy of the model with Gaussian noise (`scale` x each matrix's std) on every block weight."""
    damaged, _ = load_model(path)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in damaged.named_parameters():
            if "layers" in name and p.dim() == 2:
                p.add_(torch.randn_like(p) * p.std() * scale)
    return damaged


def test_suite_measures_every_slice_and_metric_family(tiny_suite):
    _, _, results, items, stats = tiny_suite
    slices = set(results["category"])
    assert {
        "facts",
        "arithmetic",
        "reading",
        "non_english",
        "heldout",
        "json_format",
        "tool_call",
        "should_refuse",
        "should_not_refuse",
        "long_form",
        "pii_probe",
        "cost",
    } <= slices
    assert any(s.startswith("bias_") for s in slices)
    metrics = set(results["metric"])
    for metric in (
        "acc",
        "word_perplexity",
        "format_validity",
        "tool_call_validity",
        "refusal_rate",
        "over_refusal_rate",
        "toxicity_rate",
        "pii_rate",
        "repetition_rate",
        "bias_gap",
        "latency_p50_s",
        "latency_p99_s",
        "tokens_per_second",
        "generation_peak_rss_mb",
    ):
        assert metric in metrics, metric
    gen = items[items["task"] == "qp_behaviour"]
    assert (gen["new_tokens"] <= MAX_NEW).all() and gen["output"].map(type).eq(str).all()
    assert stats["latency_requests"] > 0


def test_the_harness_starts_no_process(tiny_suite):
    """lm-eval's environment report runs `pip list` in a new interpreter (0.44 s a run, 2.5 s the first in a process)
    and its git lookup runs `git`; the runtime fingerprint records the environment instead, so neither may run."""
    model, tokenizer = tiny_suite[:2]
    started, watching = [], [True]
    sys.addaudithook(lambda event, args: started.append(args) if watching[0] and event == "subprocess.Popen" else None)
    try:
        rows, _, _ = run_harness(model, tokenizer, "base", limit=1, batch_size=4, tasks=["qp_golden_facts"])
    finally:
        watching[0] = False  # an audit hook cannot be removed: this one stops recording
    assert rows and started == []


def test_greedy_suite_is_deterministic(tiny_suite):
    model, tokenizer, _, items, _ = tiny_suite
    _, again, _ = run_suite(model, tokenizer, "base", limit=LIMIT, batch_size=4, max_new_tokens=MAX_NEW)
    gen_a = items[items["task"] == "qp_behaviour"].set_index("item_id")["output"]
    gen_b = again[again["task"] == "qp_behaviour"].set_index("item_id")["output"]
    assert gen_a.equals(gen_b)


def test_model_compared_with_itself_has_zero_delta_and_full_agreement(tiny_suite):
    model, tokenizer, results, items, _ = tiny_suite
    quant_results, quant_items = with_agreement(results, items, items, model, model, tokenizer, "quantized")
    agreeing = quant_items.dropna(subset=["top1_agreement"])
    assert len(agreeing) > 10
    assert agreeing["top1_agreement"].eq(1.0).all()
    assert agreeing["kl_divergence"].max() < 1e-5
    gens = quant_items[quant_items["task"] == "qp_behaviour"]
    assert gens["exact_match"].eq(1.0).all() and gens["prefix_agreement"].eq(1.0).all()
    deltas = compute_deltas(results, quant_results, AGREEMENT_POLICY, items, quant_items)
    assert deltas["delta"].abs().max() < 1e-5
    assert set(deltas.loc[deltas["mode"] != "", "status"]) == {WITHIN}


def test_noise_damaged_copy_fails_the_slices_it_damages_and_the_gate_everywhere(tiny_suite, tiny_llama):
    model, tokenizer, results, items, _ = tiny_suite
    damaged = noise_damaged(tiny_llama, scale=3.0, seed=1)
    quant_results, quant_items = with_agreement(results, items, items, model, damaged, tokenizer, "quantized")
    deltas = compute_deltas(results, quant_results, AGREEMENT_POLICY, items, quant_items)
    gated = deltas[deltas["mode"] != ""]
    assert len(gated) >= 20
    assert set(gated["status"]) == {REGRESSION}  # every slice it damaged, nowhere within tolerance
    top1 = gated[gated["metric"] == "top1_agreement"]
    assert (top1["ci_high"] < 1.0).all() and top1["significant"].all()
    outcome, reasons = verdict(deltas, AGREEMENT_POLICY)
    assert outcome == "FAIL" and len(reasons) == len(gated)
    md = render_markdown(deltas, AGREEMENT_POLICY, "0" * 64, "damaged", outcome, reasons)
    assert "**FAIL**" in md and "Regression beyond tolerance" in md
    ctx = ReportContext(
        model_name="tiny", artifact_id="damaged", content_hash="1" * 64, base_hash="2" * 64, recipe={},
        calibration_hash=None, runtime_hash="3" * 64, policy_name=AGREEMENT_POLICY.name, policy_hash="0" * 64,
        policy=AGREEMENT_POLICY, judged_at="now", verdict=outcome, reasons=reasons,
    )  # fmt: skip
    page = render_html(deltas, ctx, results, quant_results, {"base_mb": 27.0, "quantized_mb": 27.0})
    panels = page.count('class="delta-panel"')  # one per metric, then cost vs quality
    assert panels == deltas["metric"].nunique() and page.count("data:image/svg+xml;base64,") == panels + 1
    assert page.count('class="status-regression"') == len(gated)


@pytest.mark.parametrize("damage_output_layer", [False, True], ids=["shared_output_layer", "own_output_layer"])
def test_agreement_from_stored_base_states_equals_running_both_models(tiny_suite, tiny_llama, damage_output_layer):
    """A variant that keeps the base's output layer (as GPTQ does) is scored from the stored per-position
    summaries alone (the stored states are blanked here to prove it); one with an output layer of
    its own from the stored states through the base's head. Both must equal running both models."""
    model, tokenizer, _, items, _ = tiny_suite
    damaged = noise_damaged(tiny_llama, scale=0.5, seed=2)
    if damage_output_layer:
        with torch.no_grad():
            damaged.get_output_embeddings().weight.add_(torch.randn_like(damaged.get_output_embeddings().weight) * 0.01)
    texts = [t for t in items["probe_text"] if isinstance(t, str) and t][:6]
    path = tiny_llama.parent / "reference.safetensors"
    save_file(reference_states(model, tokenizer, texts, batch_size=4), path)  # through storage, as the pipeline does
    reference = load_file(path)
    if not damage_output_layer:
        reference["hidden_states"] = torch.zeros_like(reference["hidden_states"])
    stored = agreement_with_reference(model.get_output_embeddings(), damaged, reference, batch_size=4)
    for text, got in zip(texts, stored, strict=False):
        enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=128)
        with torch.inference_mode():
            lb = torch.log_softmax(model(**enc).logits.float(), -1)[0]
            lq = torch.log_softmax(damaged(**enc).logits.float(), -1)[0]
        assert got["kl_divergence"] == pytest.approx((lb.exp() * (lb - lq)).sum(-1).mean().item(), rel=1e-4, abs=1e-6)
        assert got["kl_divergence"] > 1e-4
        assert got["top1_agreement"] == pytest.approx((lb.argmax(-1) == lq.argmax(-1)).float().mean().item())


def test_a_changed_stored_base_reference_is_refused_with_the_file_named(tmp_path):
    path = tmp_path / "reference.safetensors"
    save_file({"input_ids": torch.arange(4), "offsets": torch.tensor([0, 4]), "hidden_states": torch.zeros(4, 8)}, path)
    record = {"key": "k", "reference_path": str(path), "reference_sha256": sha256_file(path)}
    assert load_reference(record)["hidden_states"].shape == (4, 8)
    save_file({"input_ids": torch.arange(4), "offsets": torch.tensor([0, 4]), "hidden_states": torch.ones(4, 8)}, path)
    with pytest.raises(AuditInputError, match=f"{path}.*re-materialize base_eval_results"):
        load_reference(record)
    path.unlink()
    with pytest.raises(AuditInputError, match="reference.safetensors"):
        load_reference(record)


def _items(category: str, metric: str, values: list[float], model: str) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": model,
            "task": "t",
            "category": category,
            "item_id": [f"{category}-{i}" for i in range(len(values))],
            metric: values,
        }
    )


def test_gate_fails_on_one_bad_slice_with_a_good_aggregate_and_reports_ci():
    policy = Policy.model_validate(
        {
            "name": "p",
            "min_items": 20,
            "tolerances": {"format_validity": {"direction": "higher_is_better", "tolerance": 0.10}},
        }
    )
    rng = np.random.default_rng(0)
    base_items, quant_items = [], []
    for category, (pb, pq) in {"a": (0.5, 0.9), "b": (0.5, 0.85), "c": (0.9, 0.4)}.items():
        base_items.append(_items(category, "format_validity", list(rng.random(60) < pb), "base"))
        quant_items.append(_items(category, "format_validity", list(rng.random(60) < pq), "quantized"))
    b, q = pd.concat(base_items), pd.concat(quant_items)
    results_b = pd.DataFrame(aggregate_items(b.astype({"format_validity": float}), "base"))
    results_q = pd.DataFrame(aggregate_items(q.astype({"format_validity": float}), "quantized"))
    assert results_q["value"].mean() > results_b["value"].mean()  # the aggregate improves
    deltas = compute_deltas(
        results_b, results_q, policy, b.astype({"format_validity": float}), q.astype({"format_validity": float})
    ).set_index("category")
    assert deltas.loc["c", "status"] == REGRESSION and deltas.loc["a", "status"] == WITHIN
    assert deltas.loc["c", "ci_high"] < 0 < deltas.loc["a", "ci_low"]
    assert deltas.loc["c", "n_items"] == 60


def test_too_few_items_is_not_measurable_rather_than_pass_or_fail():
    policy = Policy.model_validate(
        {
            "name": "p",
            "min_items": 20,
            "tolerances": {"refusal_rate": {"direction": "higher_is_better", "tolerance": 0.0}},
        }
    )
    b = _items("should_refuse", "refusal_rate", [1.0] * 5, "base")
    q = _items("should_refuse", "refusal_rate", [0.0] * 5, "quantized")
    deltas = compute_deltas(
        pd.DataFrame(aggregate_items(b, "base")), pd.DataFrame(aggregate_items(q, "quantized")), policy, b, q
    )
    assert deltas.iloc[0]["status"] == NOT_MEASURABLE and not deltas.iloc[0]["passed"]  # never a pass
    assert deltas.iloc[0]["reason"] == "5 paired item(s), the policy needs 20"
    assert verdict(deltas, policy)[0] == "INCOMPLETE"


def test_paired_bootstrap_interval_contains_the_true_delta_and_collapses_for_identical_items():
    rng = np.random.default_rng(0)
    base = rng.normal(0.0, 1.0, 400)
    quant = base + 0.3 + rng.normal(0, 0.1, 400)
    _, low, high = paired_bootstrap_ci(base, quant)
    assert low < 0.3 < high and high - low < 0.1  # pairing removes the between-item variance
    assert paired_bootstrap_ci(base, base)[1:] == (0.0, 0.0)


def test_greedy_rows_match_model_generate_row_for_row_while_finished_rows_leave_the_batch(tiny_llama):
    """The audit's own decode loop drops finished rows from the batch; every row must still get exactly
    the tokens `model.generate(do_sample=False)` gives it, cut at the row's budget and first stop token."""
    from quant_pipeline.evaluation.generation import chat_text, greedy_rows, stop_ids

    model, tokenizer = load_model(tiny_llama)
    prompts = ["Name a colour.", "Write a JSON object with a key a.", "Hi", "Count to five, slowly, in words."]
    budgets = [3, 12, 7, 12]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # one batch of rows with budgets of their own (a small suite shares batches across budgets)
    tokenizer.padding_side = "left"
    texts = [chat_text(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    idx, budget = list(range(len(prompts))), max(budgets)
    # a random model rarely says its stop token: make one row stop early by treating its 2nd token as one
    with torch.inference_mode():
        gen = model.generate(**enc, do_sample=False, max_new_tokens=budget, pad_token_id=pad, num_beams=1)
    new = gen[:, enc["input_ids"].shape[1] :].tolist()
    stops = stop_ids(model, tokenizer) | {new[1][1]}
    finished: list[int] = []
    rows = greedy_rows(model, enc, [budgets[i] for i in idx], stops, lambda done, _: finished.append(done))
    for row, i in enumerate(idx):
        expected = new[row][: budgets[i]]
        cut = [k for k, t in enumerate(expected) if t in stops]
        assert rows[row] == (expected[: cut[0]] if cut else expected), (i, rows[row], expected)
    assert sum(finished) == len(idx) and finished[-1] >= 1
    assert len(rows[1]) <= 1 < budgets[idx[1]]  # stopped at its own stop token, which is not kept


def test_greedy_batches_split_evenly_by_budget_and_prompt_tokens_and_share_budgets_only_to_save_a_batch(tiny_llama):
    """Every position of a left-padded prompt is computed, so batches hold prompts of similar token length, one budget
    each where that takes no more batches: 7 prompts of budget 8 and 2 of budget 5 are 2 | 3 + 4 in batches of at
    most 4; in batches of at most 5, one budget each would take 3 batches where 2 do, so they share: 4 + 5."""
    from quant_pipeline.evaluation.generation import chat_text, greedy_batches

    _, tokenizer = load_model(tiny_llama)
    prompts = ["word " * n for n in (9, 1, 30, 4, 2, 17, 6)] + ["Say a long sentence about rain please.", "Hi"]
    budgets, side = [8] * 7 + [5, 5], tokenizer.padding_side
    lengths = [len(tokenizer(chat_text(tokenizer, p), add_special_tokens=False)["input_ids"]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (budgets[i], lengths[i]))
    for batch_size, sizes in ((4, [2, 3, 4]), (5, [4, 5])):
        batches = greedy_batches(tokenizer, prompts, budgets, batch_size=batch_size)
        assert [len(idx) for idx, _, _ in batches] == sizes
        assert [i for idx, _, _ in batches for i in idx] == order  # shortest first, within each budget
        for idx, enc, budget in batches:
            assert budget == max(budgets[i] for i in idx)
            assert enc["input_ids"].shape == (len(idx), max(lengths[i] for i in idx))
            assert enc["attention_mask"].sum(1).tolist() == [lengths[i] for i in idx]  # each row its own, left-padded
            assert enc["attention_mask"][:, -1].all()
    assert {budgets[i] for i in batches[0][0]} == {5, 8}
    assert tokenizer.padding_side == side  # the tokenizer is left as it was
    assert greedy_batches(tokenizer, [], []) == []  # nothing to generate: no batch (a tokenizer refuses an empty list)


def test_the_harness_reports_requests_done_and_tokens_per_second_in_the_run_log(tiny_llama):
    import re

    from quant_pipeline.core.progress import log_progress
    from quant_pipeline.evaluation.suite import run_harness

    model, tokenizer = load_model(tiny_llama)
    lines: list[str] = []
    with log_progress(lines.append):
        _, items, _ = run_harness(model, tokenizer, "base", 2, 4)
    harness = [line for line in lines if line.startswith("base harness: ")]
    assert items and harness, lines
    assert re.fullmatch(r"base harness: (\d+)/\1 requests in \d+ s, \d+ tok/s", harness[-1]), harness


def test_the_latency_probe_and_the_agreement_report_their_progress_in_the_run_log(tiny_llama):
    """The two parts of an evaluation that had no progress line: on the default model's full suite the agreement
    ran 97 s and the latency probe 13-24 s with nothing in the run log (#13 asks for a line at least every 15 s,
    and the final count)."""
    import re

    from quant_pipeline.core.progress import log_progress

    model, tokenizer = load_model(tiny_llama)
    texts = ["The cat sat on the mat.", "Two plus two is four.", "Paris is in France.", "Rain falls."]
    reference = reference_states(model, tokenizer, texts, batch_size=2)
    lines: list[str] = []
    with log_progress(lines.append):
        latency = latency_probe(model, tokenizer, texts[:3], max_new_tokens=4, label="quantized")
        scores = agreement_with_reference(model.get_output_embeddings(), model, reference, batch_size=2)
    assert latency["requests"] == 3 and len(scores) == 4
    assert scores[0] == {"top1_agreement": 1.0, "kl_divergence": 0.0}  # the model against its own states
    assert re.fullmatch(r"quantized latency probe: 3/3 requests in \d+ s(, \d+ tok/s)?", lines[0]), lines
    assert re.fullmatch(r"agreement with the base: 4/4 texts in \d+ s, \d+ tok/s", lines[1]), lines
    assert len(lines) == 2  # each the final count, once (both ran in under 15 s)
