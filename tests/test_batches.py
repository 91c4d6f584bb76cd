"""Tokenization, masks and batching: prompt and padding unscored, the t -> t+1 shift, bucketing, data loading."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOLLY

from cbd_engine.data.batches import (
    IGNORE,
    bucketed_batches,
    collate,
    encode_row,
    encode_text,
    next_token_targets,
    response_positions,
)
from cbd_engine.data.rows import InstructionRow, read_dataset_spec, rows_from_records

ROW = InstructionRow("Name a colour.", "", "Blue is a colour.")


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


def test_alpaca_prompt_is_unscored_and_response_then_eos_is_scored(tokenizer):
    example = encode_row(tokenizer, ROW, "alpaca", 128)
    prompt_ids = tokenizer(ROW.alpaca_prompt())["input_ids"]
    response_ids = tokenizer(ROW.output, add_special_tokens=False)["input_ids"]
    assert example.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert example.labels == [IGNORE] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert tokenizer.decode(example.input_ids[example.prompt_length :]).startswith("Blue is a colour.")


def test_chat_format_uses_the_tokenizer_template(tokenizer):
    example = encode_row(tokenizer, ROW, "chat", 128)
    text = tokenizer.decode(example.input_ids)
    assert "<|im_start|>user\nName a colour.<|im_end|>" in text
    response = tokenizer.decode([t for t in example.labels if t != IGNORE])
    assert response.startswith("Blue is a colour.<|im_end|>")
    assert "user" not in response


def test_long_rows_are_cut_to_max_length_keeping_response_tokens(tokenizer):
    row = InstructionRow("x " * 400, "y " * 400, "z " * 400)
    example = encode_row(tokenizer, row, "alpaca", 64)
    assert len(example) == 64 and 0 < example.num_response_tokens <= 32


def test_collate_pads_right_and_never_scores_padding(tokenizer):
    short, long = encode_row(tokenizer, ROW, "alpaca", 128), encode_row(tokenizer, InstructionRow("a", "b", "c d e f"))
    batch = collate([short, long], pad_id=7)
    assert batch.input_ids.shape == (2, max(len(short), len(long)))
    padded = batch.attention_mask == 0
    assert (batch.labels[padded] == IGNORE).all() and (batch.input_ids[padded] == 7).all()
    assert batch.num_response_tokens == short.num_response_tokens + long.num_response_tokens


def test_logits_at_t_score_token_t_plus_1():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE]])
    assert response_positions(labels).tolist() == [[False, True, True, False, False]]
    assert next_token_targets(labels).tolist() == [[IGNORE, 5, 6, IGNORE, IGNORE]]


def test_bucketed_batches_are_deterministic_full_and_similar_in_length():
    lengths = [(i * 37) % 100 for i in range(1000)]
    epoch0 = bucketed_batches(lengths, 8, seed=1, epoch=0)
    assert epoch0 == bucketed_batches(lengths, 8, seed=1, epoch=0)
    assert epoch0 != bucketed_batches(lengths, 8, seed=1, epoch=1)
    assert all(len(b) == 8 for b in epoch0) and len({i for b in epoch0 for i in b}) == 1000
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in epoch0) / len(epoch0)
    assert spread < 10  # random batches of 8 would spread ~75


def test_plain_text_blocks_split_by_hash(tokenizer, tmp_path):
    text = " ".join(f"word{i}" for i in range(3000))
    blocks = encode_text(tokenizer, text, max_length=64)
    everything = blocks.train + blocks.dev + blocks.validation
    assert blocks.train and blocks.dev and blocks.validation
    assert all(len(e) <= 64 and e.num_response_tokens == len(e) - 1 for e in everything)


def test_dataset_spec_reads_jsonl_text_and_dolly_style_records(tmp_path):
    rows, text = read_dataset_spec({"path": str(DOLLY)})
    assert text is None and len(rows) == 1000
    plain = tmp_path / "corpus.txt"
    plain.write_text("hello world")
    assert read_dataset_spec({"path": str(plain)}) == (None, "hello world")
    dolly = rows_from_records([{"instruction": "q", "context": "c", "response": "r", "category": "x"}])
    assert dolly == [InstructionRow("q", "c", "r")]
    with pytest.raises(ValueError, match="columns"):
        rows_from_records([{"foo": 1}])
    with pytest.raises(ValueError, match="path"):
        read_dataset_spec({})
    assert json.loads(DOLLY.read_text().splitlines()[0])["output"]


def test_dataset_spec_reads_hugging_face_data_sets_from_local_folders(tmp_path):
    """dataset.hf goes through `datasets`: a folder of data files (splits named by the files, Dolly's own columns)
    and a `save_to_disk` folder give the rows of the chosen split; what cannot be read is a ValueError naming it."""
    import datasets

    source = [json.loads(line) for line in DOLLY.read_text().splitlines()[:30]]
    expected = [InstructionRow(r["instruction"], r["input"], r["output"]) for r in source]
    as_dolly = [{"instruction": r["instruction"], "context": r["input"], "response": r["output"]} for r in source]
    files = tmp_path / "files"
    files.mkdir()
    for name, records in (("train", as_dolly[:20]), ("test", as_dolly[20:])):
        (files / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_dataset_spec({"hf": str(files)}) == (expected[:20], None)
    assert read_dataset_spec({"hf": str(files), "split": "test"}) == (expected[20:], None)
    saved = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(source[:25]),
                          "validation": datasets.Dataset.from_list(source[25:])}).save_to_disk(saved)
    assert read_dataset_spec({"hf": str(saved), "split": "validation"}) == (expected[25:], None)
    with pytest.raises(ValueError, match="split 'nope'"):
        read_dataset_spec({"hf": str(saved), "split": "nope"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        read_dataset_spec({"hf": str(tmp_path / "empty")})
