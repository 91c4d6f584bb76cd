"""Tiny teacher/student pairs for fast tests: a byte-level BPE tokenizer of 512 tokens trained on Dolly's training
rows (a 49k vocabulary would make the output layer dominate every tiny test), and random Llama models on it."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from conftest import DOLLY, make_tiny_model

from cbd_engine.checkpoint import copy_side_files

VOCAB = 512


@functools.cache
def small_tokenizer() -> Path:
    """A folder with tokenizer.json/tokenizer_config.json (EOS and padding: <|endoftext|>), built once per session."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cbd_engine.data import read_instruction_rows, split_rows

    train, _ = split_rows(read_instruction_rows(DOLLY))
    texts = [row.alpaca_prompt() + row.output for row in train]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    folder = Path(tempfile.mkdtemp(prefix="cbd-test-tokenizer-"))
    fast.save_pretrained(folder)
    return folder


def tiny_with_tokenizer(folder: Path, seed: int = 0, **overrides) -> Path:
    settings = {**dict(vocab_size=VOCAB, max_position_embeddings=256, hidden_size=32, intermediate_size=64,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16), **overrides}
    make_tiny_model(folder, "llama", seed, **settings)
    copy_side_files(small_tokenizer(), folder)
    return folder
