"""Tiny teacher/student pairs for fast tests: a byte-level BPE tokenizer of 512 tokens trained on Dolly's training
rows (a 49k vocabulary would make the output layer dominate every tiny test), and random Llama models on it."""

from __future__ import annotations

import functools
import tempfile
from pathlib import Path

from conftest import DOLLY, make_tiny_model

from cbd_engine.io.checkpoint import copy_side_files

VOCAB = 512


@functools.cache
def small_tokenizer() -> Path:
    """A folder with tokenizer.json/tokenizer_config.json (EOS and padding: <|endoftext|>), built once per session."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from cbd_engine.data.rows import read_instruction_rows, split_rows

    texts = [row.alpaca_prompt() + row.output for row in split_rows(read_instruction_rows(DOLLY)).train]
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


def dolly_examples(tokenizer_dir: Path, train_rows: int = 64, valid_rows: int = 6, max_length: int = 64):
    """Splits of examples: the first rows of Dolly's training, dev and validation splits, encoded."""
    from cbd_engine.data.batches import encode_rows
    from cbd_engine.data.rows import Splits, read_instruction_rows, split_rows
    from cbd_engine.nn.loading import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    rows = split_rows(read_instruction_rows(DOLLY))
    return Splits(encode_rows(tokenizer, rows.train[:train_rows], max_length=max_length),
                  encode_rows(tokenizer, rows.dev[:valid_rows], max_length=max_length),
                  encode_rows(tokenizer, rows.validation[:valid_rows], max_length=max_length))


def assert_resumes_to_the_same_weights(run, root: Path):
    """`run(out, **kwargs)` (a distill call) cancelled after its third step, then resumed, ends with the weights and
    validation loss of an uninterrupted run; the cancelled run leaves no output folder. Returns the whole run."""
    import pytest
    import torch

    from cbd_engine.nn.loading import load_model
    from cbd_engine.spec.progress import Cancelled

    whole = run(root / "whole")
    calls = {"n": 0}

    def stop_after_step_3() -> bool:  # the last checkpoint is step 2's: step 3 is done again after resuming
        calls["n"] += 1
        return calls["n"] > 3

    with pytest.raises(Cancelled):
        run(root / "resumed", should_stop=stop_after_step_3)
    assert not (root / "resumed").exists()  # nothing half-written
    resumed = run(root / "resumed", resume=True)
    a, b = load_model(whole.path).state_dict(), load_model(resumed.path).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert whole.metrics["validation_loss"] == resumed.metrics["validation_loss"]
    return whole


# a tiny anchor pair whose every width axis shrinks (residual, KV groups, heads, FFN): trained-path tests share it
PAIR_TEACHER = dict(num_hidden_layers=3, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                    num_key_value_heads=2)
PAIR_STUDENT_SHAPE = {"num_layers": 3, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
                      "intermediate_size": 64}


def dolly_calibration():
    """The calibration the chain would record for Dolly (its first training rows and dev rows)."""
    from cbd_engine.data.calibration import Calibration
    from cbd_engine.data.rows import read_instruction_rows

    return Calibration.from_rows(read_instruction_rows(DOLLY), str(DOLLY))


def pruned_pair(root: Path, calibration) -> tuple[Path, Path]:
    """(teacher, student): a tiny teacher and the student pruned from it (its cbd.json records the lineage)."""
    from cbd_engine.materialization.recipe import materialize

    teacher = tiny_with_tokenizer(root / "teacher", seed=3, **PAIR_TEACHER)
    student = root / "student"
    materialize(student, large=teacher, shape=PAIR_STUDENT_SHAPE, calibration=calibration, dtype="float32")
    return teacher, student
