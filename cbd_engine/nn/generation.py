"""Helpers for generating with a causal LM from a batch of prompts."""

from __future__ import annotations

import torch


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [batch, longest prompt], each prompt at the right end of its row: generation
    continues right after every prompt at once. Padding positions hold `pad_id` and mask 0."""
    width = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention[row, width - len(prompt) :] = 1
    return input_ids, attention
