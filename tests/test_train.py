"""`cbd train`: a token budget fixes the schedule; text and instruction data; the curves record tokens read."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import DOLLY, SHARED_DATA
from distill_helpers import tiny_with_tokenizer

from cbd_engine.data.batches import Example
from cbd_engine.distillation.train import steps_for_budget, train
from cbd_engine.spec.distill_config import DistillConfig

SETTINGS = {"batch_size": 4, "max_length": 64, "learning_rate": 3e-3, "eval_rows": 8, "eval_every": 3,
            "device": "cpu"}


def _example(length: int) -> Example:
    return Example(list(range(length)), list(range(length)), 0)


def test_budget_sets_the_number_of_steps():
    examples = [_example(10), _example(30)]  # 20 tokens per example on average
    assert steps_for_budget(examples, 400, batch_size=2) == 10
    assert steps_for_budget(examples, 419, batch_size=2) == 10  # the closest number of steps
    assert steps_for_budget(examples, 421, batch_size=2) == 11
    assert steps_for_budget(examples, 1, batch_size=2) == 1
    with pytest.raises(ValueError, match="positive"):
        steps_for_budget(examples, 0, batch_size=2)


def _curve(folder) -> list[dict]:
    with open(folder / "loss_curve.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_text_pretraining_reads_the_budget_and_lowers_the_loss(tmp_path):
    model = tiny_with_tokenizer(tmp_path / "random", seed=5)
    budget = 4 * 64 * 9  # nine batches of four full 64-token blocks
    result = train(model, SHARED_DATA / "text" / "tinyshakespeare.txt", tmp_path / "out", budget,
                   DistillConfig.from_dict(SETTINGS))
    curve = _curve(tmp_path / "out")
    assert result.metrics["steps"] == 9
    assert int(curve[-1]["tokens"]) == budget  # text blocks are all full: the budget is read exactly
    assert [int(row["tokens"]) for row in curve] == [256 * step for step in range(10)]
    assert result.metrics["validation_loss"] < result.metrics["validation_loss_before"]
    lineage = json.loads((tmp_path / "out" / "cbd.json").read_text())["distillation"]
    assert lineage["token_budget"] == budget and lineage["config"]["loss"] == "ce" and lineage["teacher"] is None


def test_instruction_sft_from_the_command_line(tmp_path):
    model = tiny_with_tokenizer(tmp_path / "random", seed=6)
    out = tmp_path / "sft"
    command = [sys.executable, "-m", "cbd_cli", "train", str(model), "--data", str(DOLLY), "--tokens", "3000",
               "--out", str(out), "--batch-size", "4", "--max-length", "64", "--eval-rows", "8", "--device", "cpu"]
    subprocess.run(command, check=True, capture_output=True)
    metrics = json.loads((out / "metrics.json").read_text())
    tokens = int(_curve(out)[-1]["tokens"])
    assert 0.5 * 3000 < tokens < 1.5 * 3000 + 4 * 64  # instruction rows vary in length: the mean sets the steps
    assert metrics["validation_loss"] < metrics["validation_loss_before"]
    assert (out / "loss_curve.png").is_file() and (out / "model.safetensors").is_file()
