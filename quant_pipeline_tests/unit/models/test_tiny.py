"""The tiny test models' tokenizer: small, yet any text round-trips and prompts are formatted as SmolLM2's are."""

from quant_pipeline.models.tiny import VOCAB_SIZE


def test_the_tiny_tokenizer_round_trips_any_text_in_its_small_vocabulary(tiny_tokenizer):
    assert len(tiny_tokenizer) == VOCAB_SIZE
    for text in ("Quel est le résultat de 17 × 3 ?", "東京は日本の首都です。", '{"tool": "weather", "args": {}}'):
        assert tiny_tokenizer.decode(tiny_tokenizer(text)["input_ids"]) == text


def test_the_tiny_tokenizer_formats_chat_prompts_with_smollm2s_special_tokens_and_ids(
    tiny_tokenizer, smollm2_tokenizer
):
    messages = [{"role": "user", "content": "Say hello."}]
    as_text = {
        name: tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        for name, tok in (("tiny", tiny_tokenizer), ("smollm2", smollm2_tokenizer))
    }
    assert as_text["tiny"] == as_text["smollm2"]
    for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"):
        assert tiny_tokenizer.convert_tokens_to_ids(token) == smollm2_tokenizer.convert_tokens_to_ids(token)
    assert tiny_tokenizer.eos_token_id == smollm2_tokenizer.eos_token_id
