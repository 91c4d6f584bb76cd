"""Speed of evaluation against plain transformers loops (run by hand; results in docs/EVALUATION.md).

    .venv/bin/python bench/bench_eval.py [--rows 32] [--prompts 16] [--batch 16] [--new-tokens 32] [--repeats 2]

- multiple choice: rows/s of `loglikelihoods` (ARC-Easy, the harness prompts) against a plain loop that runs the
  same requests in the same batches through model(...).logits, log_softmax and gather;
- generation: prompts/s of `greedy_generate` against a plain loop of tokenizer(padding_side="left") +
  model.generate + batch_decode on the same prompts and batch size, and against one prompt at a time.
SmolLM2-135M-Instruct on CPU, float32. Each variant runs `repeats` times, interleaved; the best time counts (the
machine is shared, so the slowest runs measure the neighbours).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cbd_engine.data.batches import pad_id_of
from cbd_engine.data.rows import read_instruction_rows
from cbd_engine.evaluation.scoring import encode_pair, greedy_generate, loglikelihoods
from cbd_engine.evaluation.tasks import choice_requests, read_choice_rows
from cbd_engine.io.zoo import smollm2_135m_instruct
from cbd_engine.nn.loading import load_model, load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@torch.no_grad()
def plain_loglikelihoods(model, requests: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """The textbook loop: full logits for every position, right padding, requests in the given order."""
    totals = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start : start + batch_size]
        width = max(len(c) + len(x) for c, x in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, (context, continuation) in enumerate(chunk):
            ids[row, : len(context) + len(continuation)] = torch.tensor(context + continuation)
            mask[row, : len(context) + len(continuation)] = 1
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
        for row, (context, continuation) in enumerate(chunk):
            positions = torch.arange(len(context) - 1, len(context) + len(continuation) - 1)
            totals.append(float(logprobs[row, positions, torch.tensor(continuation)].sum()))
    return totals


@torch.no_grad()
def plain_generate(model, tokenizer, prompts: list[str], batch_size: int, new_tokens: int) -> list[str]:
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True, padding_side="left")
        generated = model.generate(**batch, do_sample=False, max_new_tokens=new_tokens,
                                   pad_token_id=pad_id_of(tokenizer), temperature=None, top_p=None, top_k=None)
        outputs += tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    return outputs


def best_times(variants: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):
        for name, run in variants.items():
            started = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - started)
    return best


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    folder = smollm2_135m_instruct()
    model, tokenizer = load_model(folder).eval(), load_tokenizer(folder)

    rows = read_choice_rows(DATA / "multiple_choice" / "arc_easy_test.jsonl", args.rows)
    requests = [encode_pair(tokenizer, *request) for request in choice_requests(rows, rows, 0)]
    ours = [total for total, _ in loglikelihoods(model, requests, args.batch)]
    assert torch.allclose(torch.tensor(ours), torch.tensor(plain_loglikelihoods(model, requests, args.batch)),
                          atol=1e-3), "the two multiple-choice loops disagree"
    mc = best_times({"engine": lambda: loglikelihoods(model, requests, args.batch),
                     "plain": lambda: plain_loglikelihoods(model, requests, args.batch)}, args.repeats)

    prompts = [row.alpaca_prompt() for row in read_instruction_rows(DATA / "instruction" / "minillm_dolly_dev.jsonl")]
    prompts = prompts[: args.prompts]
    gen = best_times({
        "engine": lambda: greedy_generate(model, tokenizer, prompts, args.new_tokens, args.batch),
        "plain": lambda: plain_generate(model, tokenizer, prompts, args.batch, args.new_tokens),
        "engine_one_at_a_time": lambda: greedy_generate(model, tokenizer, prompts, args.new_tokens, 1),
    }, args.repeats)

    report = {
        "settings": {**vars(args), "threads": torch.get_num_threads(), "torch": torch.__version__},
        "multiple_choice_rows_per_s": {name: args.rows / seconds for name, seconds in mc.items()},
        "multiple_choice_engine_vs_plain": mc["plain"] / mc["engine"],
        "generation_prompts_per_s": {name: args.prompts / seconds for name, seconds in gen.items()},
        "generation_engine_vs_plain": gen["plain"] / gen["engine"],
        "generation_batched_vs_one_at_a_time": gen["engine_one_at_a_time"] / gen["engine"],
    }
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
