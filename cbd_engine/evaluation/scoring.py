"""Batched scoring with a causal LM: log-likelihoods of continuations, greedy generation, Rouge-L.

Requests are sorted by length before batching (little padding), and the output layer is applied only at the
positions that score a continuation token: with a 49k vocabulary that is most of a forward pass's cost saved for
short answers after long contexts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from cbd_engine.data.batches import pad_id_of
from cbd_engine.nn.generation import left_padded
from cbd_engine.nn.loading import hidden_states, output_head

TokenRequest = tuple[list[int], list[int]]  # (context ids, continuation ids)
OnBatch = Callable[[int], None]  # called with the number of requests finished so far


def encode_pair(tokenizer, context: str, continuation: str) -> TokenRequest:
    """The harness's split: encode context + continuation whole and take the continuation as the tokens after the
    context's, so a continuation starting with a space tokenizes as it does in running text. Trailing spaces of
    the context move to the continuation for the same reason."""
    stripped = context.rstrip(" ")
    continuation = context[len(stripped) :] + continuation
    context_ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    whole = tokenizer(stripped + continuation, add_special_tokens=False)["input_ids"]
    if not context_ids:  # nothing to condition on: condition on the end-of-text token, as the harness does
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    return context_ids, whole[len(context_ids) :]


def _fit(request: TokenRequest, max_length: int) -> tuple[list[int], int]:
    """(sequence of at most max_length tokens, number of scored tokens at its end); long contexts lose their start."""
    context, continuation = request
    sequence = (context + continuation)[-max_length:]
    return sequence, min(len(continuation), len(sequence) - 1)


@torch.no_grad()
def loglikelihoods(model, requests: list[TokenRequest], batch_size: int = 16, max_length: int = 2048,
                   on_batch: OnBatch | None = None) -> list[tuple[float, int]]:
    """(sum of log P(continuation token | everything before it), number of scored tokens) per request."""
    if any(not continuation for _, continuation in requests):
        raise ValueError("every request needs at least one continuation token")
    device = next(model.parameters()).device
    fitted = [_fit(request, max_length) for request in requests]
    order = sorted(range(len(fitted)), key=lambda i: -len(fitted[i][0]))
    results: list[tuple[float, int]] = [(0.0, 0)] * len(fitted)
    head = output_head(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = len(fitted[chunk[0]][0])
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        scored = torch.zeros((len(chunk), width), dtype=torch.bool)  # position t scores token t + 1
        for row, index in enumerate(chunk):
            sequence, count = fitted[index]
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
            scored[row, len(sequence) - 1 - count : len(sequence) - 1] = True
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        hidden = hidden_states(model, ids, mask)[scored]
        targets = ids[:, 1:][scored[:, :-1]]
        logprobs = torch.log_softmax(head(hidden).float(), dim=-1).gather(1, targets[:, None])[:, 0]
        counts = scored.sum(1)
        sums = torch.zeros(len(chunk), dtype=torch.float64, device=device).index_add_(  # long texts: no fp32 drift
            0, torch.repeat_interleave(torch.arange(len(chunk), device=device), counts), logprobs.double())
        for row, index in enumerate(chunk):
            results[index] = (float(sums[row]), int(counts[row]))
        if on_batch:
            on_batch(min(start + batch_size, len(order)))
    return results


@torch.no_grad()
def greedy_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, batch_size: int = 16,
                    max_length: int = 2048, stop: tuple[str, ...] = (), on_batch: OnBatch | None = None,
                    add_special_tokens: bool = True, temperature: float = 0.0, top_p: float = 1.0) -> list[str]:
    """Greedy continuations of `prompts` (special tokens dropped, cut at the first `stop` string, stripped); with
    `temperature` > 0 sampled ones instead, from the nucleus `top_p` (seed torch first for repeatable samples).

    Prompts are left-padded in batches of similar length and lose their start when longer than
    max_length - max_new_tokens. `add_special_tokens=False` for prompts that carry their own (chat templates).
    """
    if max_new_tokens >= max_length:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) leaves no room for a prompt in {max_length} tokens")
    device = next(model.parameters()).device
    pad = pad_id_of(tokenizer)
    budget = max_length - max_new_tokens
    encoded = [tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"][-budget:] for prompt in prompts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    outputs = [""] * len(prompts)
    decoding = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0) if temperature > 0 else \
        dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        ids, mask = left_padded([encoded[index] for index in chunk], pad)
        width = ids.shape[1]
        generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                   max_new_tokens=max_new_tokens, pad_token_id=pad,
                                   eos_token_id=tokenizer.eos_token_id, **decoding)
        texts = tokenizer.batch_decode(generated[:, width:], skip_special_tokens=True)
        for index, text in zip(chunk, texts, strict=True):
            outputs[index] = _cut(text, stop)
        if on_batch:
            on_batch(min(start + batch_size, len(order)))
    return outputs


def _cut(text: str, stop: tuple[str, ...]) -> str:
    for marker in stop:
        text = text.split(marker, 1)[0]
    return text.strip()


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """Rouge-L F-measure per pair (rouge-score with stemming, as MiniLLM scores Dolly), in [0, 1]."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(reference, prediction)["rougeL"].fmeasure
            for prediction, reference in zip(predictions, references, strict=True)]
