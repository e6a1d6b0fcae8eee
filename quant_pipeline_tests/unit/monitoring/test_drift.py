"""Prompt drift against the golden generation prompts: fires on traffic unlike them, stays quiet on held-out
prompts of the same kinds, and says "not measurable" (never "no drift") without enough logged prompts."""

import random
from pathlib import Path

import pytest

from quant_pipeline.monitoring.drift import (
    JSD_THRESHOLD,
    MIN_PROMPTS,
    PSI_THRESHOLD,
    detect_drift,
    golden_prompts,
    prompt_length_psi,
)

PACKAGE = Path(__file__).resolve().parents[3] / "quant_pipeline"
SWAPS = {"Write": "Compose", "short": "brief", "Tell me": "Explain", "What is": "What's", "Give": "Provide"}


@pytest.fixture(scope="module")
def split():
    """The golden prompts cut in two, every slice in both halves: a reference, and held-out prompts."""
    golden = golden_prompts()
    assert len(golden) >= 2 * MIN_PROMPTS
    return golden[::2], golden[1::2]


def paraphrase(prompt: str, rng: random.Random) -> str:
    for a, b in SWAPS.items():
        prompt = prompt.replace(a, b)
    return rng.choice(["", "Please: ", "Quick question. "]) + prompt + rng.choice(["", " Thanks!", " Be concise."])


def source_code(n: int) -> list[str]:
    text = "".join(p.read_text() for p in sorted(PACKAGE.rglob("*.py")))
    return [text[i : i + 1500] for i in range(0, 1500 * n, 1500)]


def random_tokens(n: int, rng: random.Random) -> list[str]:
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    word = lambda: "".join(rng.choice(alphabet) for _ in range(rng.randint(2, 9)))  # noqa: E731
    return [" ".join(word() for _ in range(rng.randint(8, 60))) for _ in range(n)]


def test_quiet_on_held_out_prompts_of_the_same_kinds(split):
    reference, held_out = split
    same = detect_drift(held_out, reference=reference)
    assert same.measurable and same.drifted is False, same.why
    rng = random.Random(0)
    reworded = detect_drift([paraphrase(p, rng) for p in rng.sample(held_out, 60)], reference=reference)
    assert reworded.measurable and reworded.drifted is False, reworded.why
    assert reworded.why.startswith("no drift: prompt_length_psi")


@pytest.mark.parametrize("stream", ["source code", "random tokens"])
def test_fires_on_prompts_unlike_the_golden_set(stream):
    rng = random.Random(1)
    prompts = source_code(60) if stream == "source code" else random_tokens(60, rng)
    report = detect_drift(prompts)  # against the shipped golden prompts
    assert report.measurable and report.drifted is True, report.why
    assert report.prompt_length_psi > PSI_THRESHOLD and report.word_unigram_jsd > JSD_THRESHOLD
    assert report.why.startswith("drift: prompt_length_psi")
    assert report.reference == "generation_v1.jsonl" and report.reference_prompts == len(golden_prompts())


def test_too_few_or_unlogged_prompts_are_not_measurable_never_no_drift():
    few = detect_drift(source_code(MIN_PROMPTS - 1))  # would drift, but 49 prompts prove nothing either way
    assert not few.measurable and few.drifted is None and few.prompt_length_psi is None
    assert f"fewer than the {MIN_PROMPTS} needed" in few.why
    hashed_only = detect_drift([None] * 200)
    assert not hashed_only.measurable and hashed_only.drifted is None and hashed_only.unlogged == 200
    assert "200 requests were logged without their prompt" in hashed_only.why
    mixed = detect_drift(golden_prompts()[:30] + [None] * 40)
    assert (mixed.prompts, mixed.unlogged, mixed.measurable) == (30, 40, False)


def test_the_length_statistic_sees_a_change_in_kind_of_prompt_not_a_reworded_one(split):
    """Prompts that kept their kind but gained a few words stay under the bar; the same prompts at twice their
    length, or traffic of just one kind of golden prompt, do not (the JSD alone would miss both)."""
    reference, held_out = split
    rng = random.Random(2)
    assert prompt_length_psi(reference, [paraphrase(p, rng) for p in held_out]) < PSI_THRESHOLD
    doubled = detect_drift([f"{p} {p}" for p in held_out], reference=reference)
    assert doubled.drifted and doubled.prompt_length_psi > PSI_THRESHOLD and doubled.word_unigram_jsd < JSD_THRESHOLD
    stories = [p for p in held_out if p.startswith(("Write", "Tell", "Describe", "Explain"))]
    short_only = detect_drift(stories * (MIN_PROMPTS // max(1, len(stories)) + 1), reference=reference)
    assert short_only.drifted and short_only.prompt_length_psi > PSI_THRESHOLD, short_only.why
