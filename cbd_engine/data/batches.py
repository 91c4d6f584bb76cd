"""Tokenization, loss masks and batches for distillation and validation.

An example is a token sequence with `labels`: the token id where the loss applies (response tokens and the closing
EOS) and IGNORE everywhere else (prompt, padding). Models score token t+1 with the logits at t, so the loss at
position t uses labels[t + 1]; `response_positions` does that shift in one place.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

from cbd_engine.data.rows import (
    DEV,
    PROMPT_FORMATS,
    TRAIN,
    VALIDATION,
    InstructionRow,
    Splits,
    is_instruction_file,
    read_instruction_rows,
    split_of,
    split_rows,
)

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss applies
    prompt_length: int  # tokens before the response (the prompt on-policy sampling starts from)
    reference: bool = True  # the response is the data set's (False: sampled by the student, on-policy)
    index: int | None = None  # position in the training list (distill.step_examples): the teacher cache's row

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_response_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class Batch:
    input_ids: torch.Tensor  # [batch, seq] right-padded
    attention_mask: torch.Tensor  # [batch, seq] 1 on real tokens
    labels: torch.Tensor  # [batch, seq] IGNORE on prompt and padding
    reference: torch.Tensor  # [batch] bool: the response is the data set's (the cross-entropy term applies)
    index: list[int] | None = None  # the examples' Example.index, where every example has one

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device),
                     self.reference.to(device), self.index)

    @property
    def num_response_tokens(self) -> int:
        return int(response_positions(self.labels).sum())

    @property
    def num_reference_tokens(self) -> int:
        return int((response_positions(self.labels) & self.reference[:, None]).sum())

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def response_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq] bool: True at t when the logits at t score a response token (labels[t + 1] is set)."""
    scored = torch.zeros_like(labels, dtype=torch.bool)
    scored[:, :-1] = labels[:, 1:] != IGNORE
    return scored


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq]: the token the logits at t are scored against (labels shifted left; IGNORE at the end)."""
    targets = torch.full_like(labels, IGNORE)
    targets[:, :-1] = labels[:, 1:]
    return targets


def format_prompt(tokenizer, row: InstructionRow, prompt_format: str = "alpaca") -> tuple[str, str]:
    """(prompt text, response text). `alpaca` is the paper's template; `chat` the tokenizer's chat template, whose
    response part includes the end-of-turn marker."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    if prompt_format == "alpaca":
        return row.alpaca_prompt(), row.output
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template")
    user = f"{row.instruction}\n\n{row.input}" if row.input else row.instruction
    messages = [{"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": row.output}], tokenize=False)
    if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to the raw response
        return prompt, row.output
    return prompt, full[len(prompt) :]


def encode_row(tokenizer, row: InstructionRow, prompt_format: str = "alpaca", max_length: int = 512) -> Example:
    """Prompt tokens (unscored) + response tokens + EOS (scored), cut to max_length.

    A long prompt is cut from the left so that the response keeps at least half of the budget.
    """
    prompt, response = format_prompt(tokenizer, row, prompt_format)
    special = prompt_format == "alpaca"  # the chat template writes its own special tokens
    prompt_ids = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and eos not in response_ids[-2:]:  # the chat template may end with "<eos>\n"
        response_ids = response_ids + [eos]
    room_for_prompt = max(max_length - min(len(response_ids), max_length // 2), 1)
    if len(prompt_ids) > room_for_prompt:
        prompt_ids = prompt_ids[-room_for_prompt:]
    response_ids = response_ids[: max_length - len(prompt_ids)]
    ids = prompt_ids + response_ids
    labels = [IGNORE] * len(prompt_ids) + response_ids
    return Example(ids, labels, len(prompt_ids))


def encode_rows(tokenizer, rows: list[InstructionRow], prompt_format: str = "alpaca", max_length: int = 512,
                ) -> list[Example]:
    """Encoded rows that keep at least one scored token."""
    examples = [encode_row(tokenizer, row, prompt_format, max_length) for row in rows]
    return [example for example in examples if example.num_response_tokens > 0]


def encode_text(tokenizer, text: str, max_length: int = 512) -> Splits:
    """Plain text as blocks of max_length tokens, every token scored, split by the contract's hash rule applied to
    each block's text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    splits: dict[str, list[Example]] = {TRAIN: [], DEV: [], VALIDATION: []}
    for start in range(0, max(len(ids) - 1, 0), max_length):
        block = ids[start : start + max_length]
        if len(block) >= 2:
            splits[split_of(tokenizer.decode(block))].append(Example(block, list(block), 0))
    return Splits(splits[TRAIN], splits[DEV], splits[VALIDATION])


def encode_splits(tokenizer, rows: Splits, prompt_format: str = "alpaca", max_length: int = 512) -> Splits:
    """Each split of instruction rows encoded."""
    return Splits(*(encode_rows(tokenizer, part, prompt_format, max_length)
                    for part in (rows.train, rows.dev, rows.validation)))


def encode_file(tokenizer, path: str | Path, prompt_format: str = "alpaca", max_length: int = 512) -> Splits:
    """The examples of an instruction JSONL file (response tokens scored) or of a plain text file (max_length
    blocks, every token scored), by split."""
    if is_instruction_file(path):
        return encode_splits(tokenizer, split_rows(read_instruction_rows(path)), prompt_format, max_length)
    return encode_text(tokenizer, Path(path).read_text(encoding="utf-8"), max_length)


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-padded tensors; padding is unattended and unscored."""
    length = max(len(example) for example in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(examples), length), dtype=torch.long)
    for i, example in enumerate(examples):
        n = len(example)
        input_ids[i, :n] = torch.tensor(example.input_ids)
        labels[i, :n] = torch.tensor(example.labels)
        attention[i, :n] = 1
    reference = torch.tensor([example.reference for example in examples], dtype=torch.bool)
    index = [example.index for example in examples]
    return Batch(input_ids, attention, labels, reference, None if None in index else index)


def pad_id_of(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


def bucketed_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, pool: int = 64) -> list[list[int]]:
    """One epoch of example indices in global batches of `batch_size`.

    Length bucketing: examples are shuffled, then sorted by length within pools of `pool` batches, so a batch holds
    examples of similar length (little padding) while the batch order stays random. Deterministic in (seed, epoch),
    which is what lets a resumed run see exactly the batches an uninterrupted run sees. The last partial batch is
    dropped so that every step has the same global batch size.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = batch_size * pool
    batches = []
    for start in range(0, len(order), span):
        window = sorted(order[start : start + span], key=lambda i: lengths[i])
        batches += [window[i : i + batch_size] for i in range(0, len(window) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches

