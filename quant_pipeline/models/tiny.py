"""Tiny random models for tests and benchmarks: a 2-layer, 128-wide Llama with a small vocabulary.

A random model has no skill, so what a tiny audit exercises is the pipeline, not the model: every stage, record and
gate at seconds instead of minutes. With SmolLM2's 49,152 tokens about 40% of a tiny audit was work over the
vocabulary (the output layer, the log-softmax, the float64 reference summaries): one audit took 24 s in one process
against 10 s with the 4,096-token BPE below (2026-11-27). The tests, `make bench-deploy` and the tiny-audit figures
in the README all use these, so they measure the same thing.
"""

from __future__ import annotations

from pathlib import Path

from quant_pipeline.core.paths import DEFAULT_CALIBRATION, EVALS_DIR

VOCAB_SIZE = 4096


def tiny_tokenizer(base):
    """A byte-level BPE trained on the shipped evaluation and calibration text, with `base`'s first three special
    tokens at the same ids (SmolLM2: `<|endoftext|>`, `<|im_start|>`, `<|im_end|>`) and its chat template: any
    text encodes, and the suite's prompts are formatted as the base model's are. Deterministic: the same text
    trains the same merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    files = [*sorted(EVALS_DIR.glob("*.jsonl")), DEFAULT_CALIBRATION]
    texts = [line for f in files for line in f.read_text().splitlines()]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    specials = [base.convert_ids_to_tokens(i) for i in range(3)]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, **base.special_tokens_map)
    tokenizer.chat_template = base.chat_template
    if [tokenizer.bos_token_id, tokenizer.eos_token_id] != [base.bos_token_id, base.eos_token_id]:
        raise ValueError("the tiny tokenizer's special tokens moved: the base's first three ids must be its specials")
    return tokenizer


def smollm2_tiny_tokenizer():
    """`tiny_tokenizer` on the default model's (SmolLM2's) tokenizer, read from the packaged GGUF."""
    from transformers import AutoTokenizer

    from quant_pipeline.core.paths import default_gguf_path

    gguf = default_gguf_path()
    return tiny_tokenizer(AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name))


def write_tiny_llama(path: Path, tokenizer, seed: int = 0, initializer_range: float = 0.02) -> Path:
    """A 2-layer, 128-wide random Llama (torch seed `seed`) and its tokenizer, saved as safetensors in `path`.

    At transformers' default initialisation (0.02) greedy decoding is nearly independent of the prompt: the chat
    template's shared text dominates, and the small-vocabulary model answers every prompt with one repeated token.
    A larger `initializer_range` makes outputs depend on the prompt, for tests that need some prompts to move."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True,
        initializer_range=initializer_range, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return Path(path)
