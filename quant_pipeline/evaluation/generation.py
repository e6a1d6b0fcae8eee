"""Running a loaded model the way the audit needs: greedy generation, latency, and agreement.

Behaviour (formats, refusals, long outputs) only shows in generated text, and "does the quantized
model still say what the approved one said" only shows token by token; neither is a harness
accuracy. Greedy decoding with a fixed seed makes every output reproducible.
"""

from __future__ import annotations

import statistics
import time
from itertools import groupby

import torch

from quant_pipeline.core.perf import heap_for_temporaries
from quant_pipeline.core.progress import Progress
from quant_pipeline.models.architectures import logit_softcap


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt as the model sees it (its chat template where it has one)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    return prompt


def _device(model) -> torch.device:
    return next(model.parameters()).device


# Rows decoded together. Decoding one token is a matrix-vector product per layer, bound by reading the
# weights; 64 rows make it a matrix-matrix product that runs near this CPU's matmul peak (8 rows: a third
# of it), and the suite's items group by budget into few batches of that size (measured in `make bench`).
GENERATION_BATCH = 64
# Names the decode loop in every evaluation key: batch size and loop are part of what was measured, since
# a kernel that is not batch-invariant (gptqmodel's bf16 int4 CPU kernel is not) gives other greedy
# outputs in other batches. /2 writes the cache in place (kv_cache.py): the default model's 281 behaviour outputs
# are token for token those of /1, kept apart anyway so that a record says which loop made it. /3 batches prompts
# by token length, each budget on its own where that takes no more batches (`greedy_batches`): the fp32 base's 281
# outputs are again those of /2, the int4 kernel's move with their batches.
DECODER = (
    "greedy_rows/3: argmax, key/value cache written in place, finished rows leave the batch, "
    "batches by budget and prompt length"
)


def linear_layers(model) -> list:
    """The model's matrix-multiplying layers: `nn.Linear`, and quantized linears (their packed `qweight`, HQQ's
    `W_q`)."""
    return [m for m in model.modules() if isinstance(m, torch.nn.Linear) or hasattr(m, "qweight") or hasattr(m, "W_q")]


def plan(harness_batch: int) -> dict:
    """The decode loop and batch sizes an evaluation runs with: inputs of its key, and part of its record."""
    return {"decoder": DECODER, "generation_batch": GENERATION_BATCH, "harness_batch": harness_batch}


def _kernel(layer) -> str:
    """A linear layer's kernel: its class, and the tensor subclass of its weight where that decides the
    matmul (torchao keeps `nn.Linear` and swaps the weight: `Linear[Int8Tensor]`)."""
    weight = getattr(layer, "weight", None)
    if weight is None or type(weight) in (torch.nn.Parameter, torch.Tensor):
        return type(layer).__name__
    return f"{type(layer).__name__}[{type(weight).__name__}]"


def execution(model, harness_batch: int) -> dict:
    """How the model ran: its linear kernels and dtype (a quantized layer's kernel is chosen at load time
    from the library versions and the CPU), the decode loop and the batch sizes."""
    return {
        "linear_kernels": ",".join(sorted({_kernel(m) for m in linear_layers(model)})),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **plan(harness_batch),
    }


def _even_chunks(order: list[int], batch_size: int) -> list[list[int]]:
    """`order` cut into the fewest chunks of at most `batch_size`, their sizes differing by one at most."""
    count = -(-len(order) // batch_size)
    bounds = [len(order) * k // count for k in range(count + 1)] if order else [0]
    return [order[start:end] for start, end in zip(bounds[:-1], bounds[1:], strict=True)]


def greedy_batches(
    tokenizer, prompts: list[str], max_new_tokens: list[int], batch_size: int = GENERATION_BATCH
) -> list[tuple[list[int], dict, int]]:
    """The batches greedy generation runs: (prompt indices, left-padded encoding, token budget).

    The prompts, ordered by budget, then by token length, in the fewest batches of at most `batch_size`, their sizes
    differing by one at most; where that takes no more batches, each budget's prompts batch on their own. Every
    position of a left-padded prompt is computed: when batches crossed budgets, short prompts were padded to long
    ones, and the default model's 22,878 prompt tokens took 36,377 positions (27,788 now; its fp32 base's behaviour
    suite 280.7-320.5 s -> 228.6-237.1 s, the same 281 outputs, 2026-11-27). A small suite (`--eval-limit`) stays
    in one batch: split by budget, the bench's 24 prompts ran as 3 batches of 8, at 75.4 tok/s against 84.3."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        texts = [chat_text(tokenizer, p) for p in prompts]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []
        order = sorted(range(len(prompts)), key=lambda i: (max_new_tokens[i], lengths[i]))
        together = _even_chunks(order, batch_size)
        by_budget = groupby(order, key=max_new_tokens.__getitem__)
        apart = [chunk for _, group in by_budget for chunk in _even_chunks(list(group), batch_size)]
        chunks = apart if len(apart) == len(together) else together
        batches = []
        for idx in chunks:
            enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            batches.append((idx, enc, max(max_new_tokens[i] for i in idx)))
    finally:
        tokenizer.padding_side = side
    return batches


def stop_ids(model, tokenizer) -> set[int]:
    """Every token that ends a reply: the tokenizer's end of sequence and the model's generation config's
    (chat models often end a turn with a token of their own)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return {i for i in ids if i is not None}


def greedy_rows(model, enc: dict, budgets: list[int], stops: set[int], on_step=None) -> list[list[int]]:
    """Greedy new token ids for each row of a left-padded batch, each row stopped at its own budget or
    its first stop token (which is not kept).

    Plain argmax decoding with the key/value cache, as `model.generate(do_sample=False)` does it, with
    one difference that is the point: a row that has finished leaves the batch (its cache rows are
    dropped), so no step is spent on it. The cache is written in place (`kv_cache.py`: same keys and
    values, no copy per step). `on_step(finished, tokens)` is called after each step."""
    from quant_pipeline.evaluation.kv_cache import decode_cache

    dev = _device(model)
    ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = decode_cache(model, ids.shape[1] + max(budgets, default=0))
    out: list[list[int]] = [[] for _ in budgets]
    live = list(range(len(budgets)))  # batch rows still generating, in cache order
    with torch.inference_mode():
        logits = model(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, logits_to_keep=1
        ).logits[:, -1]
        while True:
            tokens = logits.argmax(-1).tolist()
            keep = []
            for slot, (row, token) in enumerate(zip(live, tokens, strict=True)):
                if token not in stops and budgets[row] > 0:
                    out[row].append(token)
                    if len(out[row]) < budgets[row]:
                        keep.append(slot)
            if on_step is not None:
                on_step(len(live) - len(keep), len(live))
            if not keep:
                return out
            if len(keep) < len(live):
                slots = torch.tensor(keep, device=dev)
                cache.batch_select_indices(slots)
                mask, positions, live = mask[slots], positions[slots], [live[s] for s in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            positions = positions[:, -1:] + 1
            step_ids = torch.tensor([[out[row][-1]] for row in live], device=dev)
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=positions, cache=cache).logits[:, -1]


def generate_greedy(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: list[int],
    batch_size: int = GENERATION_BATCH,
    label: str = "",
    on_step=None,
) -> list[dict]:
    """Greedy outputs for each prompt: new token ids, text, and the batch's seconds per item.

    Each output is cut at its own budget and at its first stop token. With a ``label`` the loop
    reports its progress (prompts done, tokens/s; see core/progress.py). ``on_step(finished, tokens)``
    runs after every decode step; whatever it raises stops the generation there (the server's
    request deadline), and it never changes a token."""
    torch.manual_seed(0)
    stops = stop_ids(model, tokenizer)
    out: list[dict | None] = [None] * len(prompts)
    progress = Progress(label, len(prompts), "prompts") if label else None
    hooks = [] if progress is None else [lambda finished, tokens: progress.advance(finished, tokens=tokens)]
    hooks += [on_step] if on_step is not None else []
    on_step = (lambda finished, tokens: [hook(finished, tokens) for hook in hooks]) if hooks else None
    for idx, enc, _ in greedy_batches(tokenizer, prompts, max_new_tokens, batch_size):
        t0 = time.perf_counter()
        rows = greedy_rows(model, enc, [max_new_tokens[i] for i in idx], stops, on_step)
        seconds = time.perf_counter() - t0
        for row, (i, ids) in enumerate(zip(idx, rows, strict=True)):
            out[i] = {
                "prompt_tokens": int(enc["attention_mask"][row].sum()),
                "output_ids": ids,
                "output": tokenizer.decode(ids, skip_special_tokens=True),
                "batch_seconds": seconds / len(idx),
            }
    if progress is not None:
        progress.close()
    return out  # type: ignore[return-value]


def latency_probe(model, tokenizer, prompts: list[str], max_new_tokens: int = 32, label: str = "") -> dict:
    """One request at a time, as a server would see them: latency percentiles and tokens/s (the progress is
    counted after each request's clock stops)."""
    latencies, tokens = [], 0
    with Progress(f"{label} latency probe".lstrip(), len(prompts), "requests") as progress:
        for prompt in prompts:
            t0 = time.perf_counter()
            result = generate_greedy(model, tokenizer, [prompt], [max_new_tokens], batch_size=1)[0]
            latencies.append(time.perf_counter() - t0)
            tokens += len(result["output_ids"])
            progress.advance(tokens=len(result["output_ids"]))
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {
        "latency_p50_s": round(statistics.median(latencies), 4),
        "latency_p95_s": round(q[94], 4),
        "latency_p99_s": round(q[98], 4),
        "tokens_per_second": round(tokens / sum(latencies), 2) if latencies else 0.0,
        "requests": len(latencies),
    }


def sequence_logprob(model, tokenizer, texts: list[str], batch_size: int = 8) -> list[float]:
    """Total log-probability of each text under the model (used for paired bias probes)."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True).to(_device(model))
        with torch.inference_mode():
            logits = model(**enc).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
        out += (lp * enc["attention_mask"][:, 1:]).sum(-1).tolist()
    return out


def right_padded(seqs: list, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as one right-padded batch: (input_ids, attention_mask)."""
    width = max(len(x) for x in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.int64)
    mask = torch.zeros(len(seqs), width, dtype=torch.int64)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.as_tensor(seq, dtype=torch.int64)
        mask[row, : len(seq)] = 1
    return ids, mask


def _by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices in batches of similar length, so little of each forward pass is spent on padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def reference_states(
    model, tokenizer, texts: list[str], max_tokens: int = 128, batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """The base model's final hidden states on `texts`: what its exact next-token distributions are
    recomputed from (logits = output embeddings of the last hidden state, soft-capped where the model caps
    them: `softcapped`) without re-running it.

    Hidden states are vocab/hidden times smaller than the log-probs (85x for SmolLM2). Alongside
    them, per position (one output-layer product per text, no second forward), what every quantized variant
    needs of the base's distribution p when it shares the base's output layer W (GPTQ leaves it
    untouched): the top-1 token, sum p log p, and the expected output embedding p @ W, so that
    KL(p || q) = sum p log p - (h_q . (p @ W) - logsumexp(W h_q)) needs no vocab-sized work on the
    base's side (a soft-capped head is not linear in h_q: there the base's distributions are recomputed from
    the states instead). Computed once per base, here, instead of once per variant. Returns flat tensors
    (a safetensors file's worth): every text's token ids, each text's offset, the states, the summaries."""
    encoded = [tokenizer(t, truncation=True, max_length=max_tokens)["input_ids"] for t in texts]
    offsets = torch.tensor([0] + [len(e) for e in encoded], dtype=torch.int64).cumsum(0)
    decoder, head, dev = model.get_decoder(), model.get_output_embeddings(), _device(model)
    cap, width, total = logit_softcap(model.config), model.config.get_text_config().hidden_size, int(offsets[-1])
    # written in place, text by text: nothing the loop keeps is allocated between the vocabulary-sized temporaries
    # it frees, so the heap can serve them (core.perf.heap_for_temporaries). Kept as a tensor per text, they
    # fragmented it: 16.0 GB peak RSS on the default model's 555 probe texts without the process's 1 MB bound
    out = {
        "input_ids": torch.tensor([t for e in encoded for t in e], dtype=torch.int64),
        "offsets": offsets,
        "hidden_states": torch.empty(total, width),
        "top1": torch.empty(total, dtype=torch.int64),
        "neg_entropy": torch.empty(total, dtype=torch.float64),
        "expected_embedding": torch.empty(total, width),
    }
    if encoded:
        _check_logits_are_head_of_hidden(model, torch.tensor([encoded[0]]))
    progress = Progress("base reference states", len(texts), "texts")
    with heap_for_temporaries(), torch.inference_mode():
        bounds, weight = offsets.tolist(), head.weight.float()  # once, not per text (a bf16 head is converted here)
        for idx in _by_length([len(e) for e in encoded], batch_size):
            ids, mask = right_padded([encoded[i] for i in idx])
            progress.advance(len(idx), tokens=int(mask.sum()))
            hidden = decoder(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
            for row, i in enumerate(idx):
                lo, hi = bounds[i], bounds[i + 1]
                out["hidden_states"][lo:hi] = hidden[row, : hi - lo]
                # float64: KL is a small difference of O(log vocab) terms, so the entropy needs the digits
                logp = torch.log_softmax(softcapped(head(hidden[row, : hi - lo]).double(), cap), -1)
                p = logp.exp()
                out["top1"][lo:hi] = logp.argmax(-1)
                out["neg_entropy"][lo:hi] = (p * logp).sum(-1)
                out["expected_embedding"][lo:hi] = p.float() @ weight
    progress.close()
    return out


def softcapped(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Logits through the model's soft-cap, c * tanh(logits / c) (Gemma 2's `final_logit_softcapping`), in
    the order transformers applies it; unchanged where the model has none."""
    return logits if cap is None else torch.tanh(logits / cap) * cap


def _check_logits_are_head_of_hidden(model, ids: torch.Tensor) -> None:
    """The premise of working from final hidden states: the model's logits are its output layer applied to
    them, then its soft-cap where it has one (no other scaling in between). Checked on a few tokens."""
    ids = ids[:1, :16].to(_device(model))
    with torch.inference_mode():
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state
        recomputed = softcapped(model.get_output_embeddings()(hidden), logit_softcap(model.config))
        same = torch.allclose(recomputed.float(), model(input_ids=ids).logits.float(), atol=1e-4)
    if not same:
        raise ValueError(
            f"{type(model).__name__}: logits are not the (soft-capped) output embeddings of the last hidden state, "
            "so agreement cannot be measured from stored states"
        )


def _same_output_layer(a, b) -> bool:
    return (
        a.bias is None
        and b.bias is None
        and a.weight.shape == b.weight.shape
        and torch.equal(a.weight.float(), b.weight.to(a.weight.device).float())
    )


def agreement_with_reference(base_head, model, reference: dict[str, torch.Tensor], batch_size: int = 8) -> list[dict]:
    """Per reference text: next-token top-1 agreement and mean KL(base || model) over its positions.

    Only `model` runs a forward pass. When it shares the base's output layer (byte-equal weights, no
    bias: GPTQ quantizes the blocks only) and no soft-cap, the base's side is read from the summaries
    stored with its states; otherwise the base's distributions are recomputed from its stored final
    hidden states through `base_head` and the soft-cap (the base's: `model` is the base quantized, its
    config the base's). Both are exact (the first up to float rounding of the same sums)."""
    offsets = reference["offsets"].tolist()
    spans = list(zip(offsets[:-1], offsets[1:], strict=True))
    dev, head, cap = _device(model), model.get_output_embeddings(), logit_softcap(model.config)
    shared = "expected_embedding" in reference and _same_output_layer(base_head, head)
    if shared and spans:
        _check_logits_are_head_of_hidden(model, reference["input_ids"][None, spans[0][0] : spans[0][1]])
    out: list[dict | None] = [None] * len(spans)
    progress = Progress("agreement with the base", len(spans), "texts")
    for idx in _by_length([hi - lo for lo, hi in spans], batch_size):
        ids, mask = right_padded([reference["input_ids"][spans[i][0] : spans[i][1]] for i in idx])
        with torch.inference_mode():
            if shared:
                hidden = model.get_decoder()(input_ids=ids.to(dev), attention_mask=mask.to(dev)).last_hidden_state
                logits = softcapped(head(hidden), cap).float()
                lse, q_top1, hidden = torch.logsumexp(logits, -1).cpu(), logits.argmax(-1).cpu(), hidden.float().cpu()
                lq_all = None if cap is None else torch.log_softmax(logits.cpu(), -1)
            else:
                lq_all = torch.log_softmax(
                    model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits.float().cpu(), -1
                )
            for row, i in enumerate(idx):
                lo, hi = spans[i]
                if shared and torch.equal(hidden[row, : hi - lo], reference["hidden_states"][lo:hi]):
                    # the base's own states through the same output layer: the same distributions, exactly
                    # (the summed form below would leave float rounding where the answer is zero)
                    out[i] = {"top1_agreement": 1.0, "kl_divergence": 0.0}
                    continue
                if shared and cap is None:
                    cross = (hidden[row, : hi - lo].double() * reference["expected_embedding"][lo:hi].double()).sum(-1)
                    kl = reference["neg_entropy"][lo:hi].double() - (cross - lse[row, : hi - lo].double())
                    top1 = (reference["top1"][lo:hi] == q_top1[row, : hi - lo]).float()
                else:
                    states = reference["hidden_states"][lo:hi].to(base_head.weight.device, base_head.weight.dtype)
                    lb = torch.log_softmax(softcapped(base_head(states), cap).float().cpu(), -1)
                    lq = lq_all[row, : hi - lo]
                    kl = (lb.exp() * (lb - lq)).sum(-1)
                    top1 = (lb.argmax(-1) == lq.argmax(-1)).float()
                out[i] = {"top1_agreement": top1.mean().item(), "kl_divergence": max(kl.mean().item(), 0.0)}
        progress.advance(len(idx), tokens=int(mask.sum()))
    progress.close()
    return out  # type: ignore[return-value]
