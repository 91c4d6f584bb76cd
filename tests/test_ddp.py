"""The same recipe under torchrun: two gloo processes on CPU train like one process on the same global batch."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DOLLY
from distill_helpers import tiny_with_tokenizer

from cbd_engine.nn.loading import load_model

WORKER = Path(__file__).with_name("ddp_worker.py")


def _launch(nproc: int, teacher: Path, student: Path, out: Path, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(WORKER), str(teacher), str(student), str(DOLLY), str(out), *extra]
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]


def _losses(out: Path) -> list[float]:
    with open(out / "loss_curve.csv") as handle:
        return [float(row["loss"]) for row in csv.DictReader(handle) if row["loss"]]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_model(out).state_dict()


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_ddp_and_fsdp(tmp_path):
    """Validation, best-checkpoint selection and checkpoints every step included (the FSDP student is gathered)."""
    teacher = tiny_with_tokenizer(tmp_path / "teacher", seed=1, num_hidden_layers=2)
    student = tiny_with_tokenizer(tmp_path / "student", seed=2, num_hidden_layers=2)
    _launch(1, teacher, student, tmp_path / "one")
    one, weights = _losses(tmp_path / "one"), _weights(tmp_path / "one")
    assert len(one) == 4
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        _launch(2, teacher, student, tmp_path / name, *extra)
        assert _losses(tmp_path / name) == pytest.approx(one, rel=1e-4), name
        other = _weights(tmp_path / name)
        assert all(torch.allclose(weights[k], other[k], atol=1e-5) for k in weights), name


@pytest.mark.slow
def test_fsdp_run_stopped_and_resumed_ends_with_the_weights_of_an_uninterrupted_one(tmp_path):
    teacher = tiny_with_tokenizer(tmp_path / "teacher", seed=1, num_hidden_layers=2)
    student = tiny_with_tokenizer(tmp_path / "student", seed=2, num_hidden_layers=2)
    _launch(2, teacher, student, tmp_path / "whole", "--fsdp")
    _launch(2, teacher, student, tmp_path / "resumed", "--fsdp", "--stop-after", "3")
    assert not (tmp_path / "resumed").exists()
    checkpoint = json.loads((tmp_path / "resumed.work" / "checkpoint" / "state.json").read_text())
    assert checkpoint["step"] == 3
    _launch(2, teacher, student, tmp_path / "resumed", "--fsdp", "--resume")
    whole, resumed = _weights(tmp_path / "whole"), _weights(tmp_path / "resumed")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "whole")


@pytest.mark.slow
def test_fsdp_generates_like_ddp_for_on_policy_sampling_and_rouge_selection(tmp_path):
    """Generation calls the model outside the sharded forward: FSDP gathers the root's weights for it and keeps the
    ranks' forwards in step (a rank that samples nothing still runs them), so it trains as DDP does."""
    teacher = tiny_with_tokenizer(tmp_path / "teacher", seed=1, num_hidden_layers=2)
    student = tiny_with_tokenizer(tmp_path / "student", seed=2, num_hidden_layers=2)
    runs = {}
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        _launch(2, teacher, student, tmp_path / name, "--on-policy", "--rouge", *extra)
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        runs[name] = (_losses(tmp_path / name), _weights(tmp_path / name), metrics)
        assert metrics["selected_by"] == "rouge_l" and len(runs[name][0]) == 4
    (ddp_losses, ddp_weights, ddp_metrics), (fsdp_losses, fsdp_weights, fsdp_metrics) = runs["ddp"], runs["fsdp"]
    assert fsdp_losses == pytest.approx(ddp_losses, rel=1e-4)
    assert fsdp_metrics["rouge_l"] == pytest.approx(ddp_metrics["rouge_l"])
    assert all(torch.allclose(ddp_weights[k], fsdp_weights[k], atol=1e-5) for k in ddp_weights)


@pytest.mark.slow
def test_minillm_runs_under_ddp_and_fsdp_alike(tmp_path):
    """Rollouts per rank (FSDP: decoding in step across ranks), the policy update and the language-modeling term
    through the wrapper, normalized by the tokens of all ranks: FSDP trains as DDP does."""
    teacher = tiny_with_tokenizer(tmp_path / "teacher", seed=1, num_hidden_layers=2)
    student = tiny_with_tokenizer(tmp_path / "student", seed=2, num_hidden_layers=2)
    text = tmp_path / "lm.txt"
    text.write_text(" ".join(json.loads(line)["output"] for line in DOLLY.read_text().splitlines()[:200]))
    runs = {}
    for name, extra in (("ddp", ()), ("fsdp", ("--fsdp",))):
        _launch(2, teacher, student, tmp_path / name, "--minillm", str(text), *extra)
        with open(tmp_path / name / "loss_curve.csv") as handle:
            rows = [row for row in csv.DictReader(handle) if row["loss"]]
        assert len(rows) == 4 and all(float(row["cross_entropy"]) > 0 for row in rows), name
        runs[name] = ([float(row["loss"]) for row in rows], _weights(tmp_path / name))
    assert runs["fsdp"][0] == pytest.approx(runs["ddp"][0], rel=1e-4)
    assert all(torch.allclose(runs["ddp"][1][k], runs["fsdp"][1][k], atol=1e-5) for k in runs["ddp"][1])
