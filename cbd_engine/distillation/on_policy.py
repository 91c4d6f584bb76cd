"""On-policy distillation's data: the student answers the prompts itself (Agarwal et al.'s GKD), except a `data_mix`
fraction of examples that keep the data set's response."""

from __future__ import annotations

import random

import torch
from torch import nn

from cbd_engine.data.batches import IGNORE, Example, pad_id_of
from cbd_engine.nn.generation import left_padded
from cbd_engine.spec.distill_config import DistillConfig


@torch.no_grad()
def sample_responses(student: nn.Module, examples: list[Example], tokenizer, config: DistillConfig,
                     rng: random.Random, synced: bool = False) -> list[Example]:
    """Replace the response of each example by one the student samples, except a `data_mix` fraction that keeps
    the data set's response. Sampled responses are scored by the divergence only, never by cross-entropy.
    `synced` (FSDP): every rank runs the same number of forwards, as each one gathers weights with the others
    (transformers' `synced_gpus`); a rank with nothing to sample samples one response and drops it."""
    chosen = [i for i in range(len(examples)) if rng.random() >= config.data_mix]
    sampled = chosen or ([0] if synced else [])
    if not sampled:
        return examples
    device = next(student.parameters()).device
    pad_id, eos = pad_id_of(tokenizer), tokenizer.eos_token_id
    prompts = [examples[i].input_ids[: examples[i].prompt_length] for i in sampled]
    input_ids, attention = left_padded(prompts, pad_id)
    width = input_ids.shape[1]
    was_training = student.training
    student.eval()
    room = max(config.max_length - width, 1)
    generated = student.generate(
        input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=True,
        temperature=config.sample_temperature, top_k=0, top_p=1.0, max_new_tokens=min(config.max_new_tokens, room),
        pad_token_id=pad_id, eos_token_id=eos, synced_gpus=synced,
    )[:, width:].tolist()
    student.train(was_training)
    result = list(examples)
    for i, response in zip(chosen, generated[: len(chosen)], strict=True):  # a lone synced sample is dropped
        if eos is not None and eos in response:
            response = response[: response.index(eos) + 1]
        prompt = examples[i].input_ids[: examples[i].prompt_length]
        response = response[: max(config.max_length - len(prompt), 1)]
        result[i] = Example(prompt + response, [IGNORE] * len(prompt) + response, len(prompt), reference=False)
    return result
