"""The same recipe under torchrun: two gloo processes on CPU train like one process on the same global batch."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DOLLY
from distill_helpers import tiny_with_tokenizer

from cbd_engine.models import load_model

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


@pytest.mark.slow
def test_two_gloo_processes_match_one_process_with_ddp_and_fsdp(tmp_path):
    teacher = tiny_with_tokenizer(tmp_path / "teacher", seed=1, num_hidden_layers=2)
    student = tiny_with_tokenizer(tmp_path / "student", seed=2, num_hidden_layers=2)
    _launch(1, teacher, student, tmp_path / "one")
    one, weights = _losses(tmp_path / "one"), load_model(tmp_path / "one").state_dict()
    assert len(one) == 3
    for name, extra in (("ddp", ()), ("fsdp", ("fsdp",))):
        _launch(2, teacher, student, tmp_path / name, *extra)
        assert _losses(tmp_path / name) == pytest.approx(one, rel=1e-4), name
        other = load_model(tmp_path / name).state_dict()
        assert all(torch.allclose(weights[k], other[k], atol=1e-5) for k in weights), name
