"""Each supported architecture audited end to end with the real pipeline, on a tiny random checkpoint of its own;
a method that cannot quantize an architecture refused by the pre-run check in one line, leaving nothing behind.

One store and one MLflow database for every architecture (like `audited_methods` in e2e/test_methods.py): a
base evaluation per architecture, reused by every candidate of it."""

import contextlib
from pathlib import Path

import dagster as dg
import pandas as pd
import pytest
import torch
from transformers import AutoConfig

from quant_pipeline.core.errors import AuditInputError
from quant_pipeline.defs.candidates import MODEL_STAGES
from quant_pipeline.defs.preflight import preflight
from quant_pipeline.evaluation.generation import agreement_with_reference, reference_states
from quant_pipeline.models.checkpoint import load_model
from quant_pipeline_tests.support import TINY_RECIPE, fresh_audit_world, replace, run_audit

SOFTCAP = 0.5  # far below Gemma 2's 30: a random tiny model's logits are small, and the cap must bite to be seen


def tiny_config(arch: str, tokenizer):
    """A 2-layer, 64-wide config of the architecture, with the SmolLM2 tokenizer's vocabulary and special tokens."""
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        GPT2Config,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
    )

    special = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if arch == "gpt2":
        return GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=1024, **special)
    block = {
        "vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, **special,
    }  # fmt: skip
    if arch == "gemma2":
        return Gemma2Config(**block, head_dim=16, pad_token_id=None, final_logit_softcapping=SOFTCAP)
    if arch == "gemma3":
        return Gemma3TextConfig(**block, head_dim=16, pad_token_id=None)
    if arch == "phi3":
        return Phi3Config(**block, pad_token_id=None)
    return {"mistral": MistralConfig, "qwen2": Qwen2Config}[arch](**block)


def build_checkpoint(root: Path, arch: str, tokenizer) -> Path:
    from transformers import AutoModelForCausalLM

    path = root / f"tiny-{arch}"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config(arch, tokenizer)).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


# Llama is not repeated here: every method is audited on the tiny Llama already (e2e/test_methods.py), and each
# audit here costs 30-50 s on this machine
ARCHITECTURES = ("mistral", "qwen2", "phi3", "gemma2", "gemma3", "gpt2")
AUDITED = [(arch, "gptq") for arch in ARCHITECTURES] + [("gpt2", "bnb-int8")]
# torchao's `quantize_` and HQQ swap torch.nn.Linear only; GPT-2's blocks are Conv1D
REFUSED = [("gpt2", "torchao-int8-weight"), ("gpt2", "hqq")]


class Audits:
    """Each (architecture, method) audited once, on demand, in one store, one MLflow registry and one Dagster
    instance shared by all: several models side by side, as a user's instance holds them (each model's
    tradeoff and its identity check read that model's partition only)."""

    def __init__(self, root: Path, tokenizer):
        self.root, self.tokenizer = root, tokenizer
        self.settings, self.tracker = fresh_audit_world(root, root / "unused")
        self.models: dict[str, Path] = {}
        self.runs: dict[tuple[str, str], tuple] = {}
        self.stack = contextlib.ExitStack()
        self.instance = self.stack.enter_context(dg.instance_for_test(temp_dir=str(root / "dagster")))

    def __call__(self, arch: str, method: str):
        """(settings, runs) of the audit of `arch` with `method`."""
        if arch not in self.models:
            self.models[arch] = build_checkpoint(self.root, arch, self.tokenizer)
        if (arch, method) not in self.runs:
            recipe = TINY_RECIPE.model_copy(update={"method": method})
            case = replace(self.settings, model=str(self.models[arch]), recipe=recipe, eval_max_new_tokens=4)
            self.runs[arch, method] = (case, run_audit(case, self.tracker, self.instance))
        return self.runs[arch, method]


@pytest.fixture(scope="module")
def audits(tmp_path_factory, tiny_tokenizer):
    audits = Audits(tmp_path_factory.mktemp("architectures"), tiny_tokenizer)
    with audits.stack:
        yield audits


@pytest.mark.parametrize(("arch", "method"), AUDITED, ids=[f"{a}-{m}" for a, m in AUDITED])
def test_each_architecture_is_audited_to_a_verdict(audits, arch, method):
    _, run = audits(arch, method)
    assert run.success, [e.message for e in run.all_events if e.is_failure]
    report = run.output_for_node("delta_report")
    assert report["verdict"] in ("PASS", "FAIL", "INCOMPLETE")
    artifact = run.output_for_node("quantized_artifact")
    model, _ = load_model(Path(artifact["path"]))  # the registered artifact reloads, quantized
    assert model.config.model_type == AutoConfig.from_pretrained(audits.models[arch]).model_type
    assert model.config.quantization_config
    if method == "gptq":  # packed layers, reloaded as such (GPT-2's Conv1D ones too)
        assert any(hasattr(m, "qweight") for m in model.modules())
    if model.config.get_text_config().tie_word_embeddings:  # a tied output layer reloads tied, not re-initialised
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


@pytest.mark.parametrize(("arch", "method"), REFUSED, ids=[f"{a}-{m}" for a, m in REFUSED])
def test_a_method_that_cannot_quantize_the_architecture_is_refused_before_any_work(audits, arch, method):
    case, run = audits(arch, method)
    with pytest.raises(AuditInputError) as err:
        preflight(case, case.recipe)
    message = str(err.value)
    assert "\n" not in message and f"recipe.method={method!r} cannot quantize tiny-{arch} (gpt2)" in message
    assert "Conv1D" in message and "use gptq, bnb-int8 or bnb-nf4" in message
    assert not run.success
    made = {e.asset_key.to_user_string() for e in run.get_asset_materialization_events()}
    assert made <= set(MODEL_STAGES)  # the model's own stages only (the base evaluation, shared)
    prefix = {"torchao-int8-weight": "torchao-int8w", "hqq": "hqq-"}[method]
    artifacts = Path(case.store_dir) / "artifacts"
    assert not [p for p in artifacts.iterdir() if p.name.startswith(prefix)]
    versions = audits.tracker.client().search_model_versions(f"name='tiny-{arch}'")
    assert not [v for v in versions if v.tags.get("artifact_id", "").startswith(prefix)]


@pytest.mark.parametrize("arch", ["gemma2", "gpt2"])
def test_agreement_is_measured_not_refused_on_soft_capped_and_conv1d_models(audits, arch):
    _, run = audits(arch, "gptq")
    deltas = pd.read_parquet(Path(run.output_for_node("delta_report")["path"]).with_name("delta_report.parquet"))
    agreement = deltas[deltas["metric"].isin(["top1_agreement", "kl_divergence"])]
    assert len(agreement) and agreement["quantized"].notna().all()


@pytest.mark.parametrize("head", ["shared", "own"])
def test_agreement_through_a_soft_capped_head_equals_the_kl_of_the_models_own_logits(audits, head):
    """Exact, not refused: the stored states are capped as the model caps its logits, on both paths (the
    variant sharing the base's output layer, and the one with an output layer of its own)."""
    audits("gemma2", "gptq")  # builds the checkpoint
    base, tokenizer = load_model(audits.models["gemma2"])
    assert base.config.final_logit_softcapping == SOFTCAP
    texts = ["The capital of France is Paris.", "def add(a, b):\n    return a + b", "Water boils at 100 degrees."]
    reference = reference_states(base, tokenizer, texts, batch_size=2)
    variant, _ = load_model(audits.models["gemma2"])
    with torch.no_grad():
        if head == "own":  # untied first: an output layer of its own, the input embeddings left as the base's
            variant.lm_head.weight = torch.nn.Parameter(variant.lm_head.weight.clone())
        layer = variant.lm_head if head == "own" else variant.get_decoder().layers[0].mlp.down_proj
        layer.weight.add_(torch.randn_like(layer.weight) * 0.05)
    measured = agreement_with_reference(base.get_output_embeddings(), variant, reference, batch_size=2)
    for text, scores in zip(texts, measured, strict=True):
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            lb, lq = base(ids).logits.log_softmax(-1)[0], variant(ids).logits.log_softmax(-1)[0]
        kl = (lb.exp() * (lb - lq)).sum(-1).mean().item()
        assert scores["kl_divergence"] == pytest.approx(kl, rel=1e-3, abs=1e-7) and kl > 1e-5
        assert scores["top1_agreement"] == (lb.argmax(-1) == lq.argmax(-1)).float().mean().item()
