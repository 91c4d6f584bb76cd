"""Run one tiny distillation under torchrun (used by test_ddp.py): teacher student data out [fsdp]."""

from __future__ import annotations

import sys
from pathlib import Path

import torch.distributed as dist

from cbd_engine.batches import encode_rows
from cbd_engine.data import read_instruction_rows, split_rows
from cbd_engine.distill import DistillConfig, distill
from cbd_engine.models import load_tokenizer


def main() -> None:
    teacher, student, data, out = (Path(arg) for arg in sys.argv[1:5])
    fsdp = len(sys.argv) > 5 and sys.argv[5] == "fsdp"
    tokenizer = load_tokenizer(student)
    train_rows, valid_rows = split_rows(read_instruction_rows(data))
    train = encode_rows(tokenizer, train_rows[:32], max_length=64)
    valid = encode_rows(tokenizer, valid_rows[:4], max_length=64)
    config = DistillConfig(steps=3, batch_size=4, micro_batch_size=1, learning_rate=3e-3, max_length=64,
                           device="cpu", ce_weight=0.3, fsdp=fsdp)
    distill(teacher, student, train, valid, out, config)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
