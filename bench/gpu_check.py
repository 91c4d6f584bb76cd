"""Device checks on an accelerator (run by hand: `python bench/gpu_check.py TOKENIZER_DIR DOLLY_JSONL [DEVICE STEPS]`).

A tiny teacher/student pair with SmolLM2's tokenizer: off_policy and on_policy distillation with device="gpu"
(bf16 autocast, activation checkpointing), checking that the loss falls and the output folder is complete; and the
chunked loss against the eager one in bf16 on the device.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cbd_engine.data.batches import encode_rows
from cbd_engine.data.rows import read_instruction_rows, split_rows
from cbd_engine.distillation.recipe import distill
from cbd_engine.io.checkpoint import copy_side_files
from cbd_engine.nn.loading import load_tokenizer
from cbd_engine.nn.losses import LossConfig, chunked_token_losses, eager_token_losses
from cbd_engine.spec.distill_config import DistillConfig


def tiny(folder: Path, tokenizer_dir: Path, layers: int, seed: int) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=49152,
                                  max_position_embeddings=512, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    copy_side_files(tokenizer_dir, folder)
    return folder


def main() -> None:
    tokenizer_dir, dolly = Path(sys.argv[1]), Path(sys.argv[2])
    device = sys.argv[3] if len(sys.argv) > 3 else "gpu"
    steps = int(sys.argv[4]) if len(sys.argv) > 4 else 30
    torch_device = "cuda" if device == "gpu" else device
    report = {"device": torch.cuda.get_device_name(0) if device == "gpu" else device}
    s_head = torch.nn.Linear(576, 49152, bias=False).to(torch_device)
    t_head = torch.nn.Linear(576, 49152, bias=False).to(torch_device).requires_grad_(False)
    h, th = torch.randn(2048, 576, device=torch_device), torch.randn(2048, 576, device=torch_device)
    targets = torch.randint(0, 49152, (2048,), device=torch_device)
    fp32 = eager_token_losses(s_head(h), targets, t_head(th))[0].item()
    with torch.autocast(torch_device, dtype=torch.bfloat16):
        bf16 = chunked_token_losses(h, s_head, targets, th, t_head, LossConfig())[0].item()
    report["loss_bf16_chunked_vs_fp32_eager_rel"] = abs(bf16 - fp32) / fp32
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        teacher, student = tiny(root / "t", tokenizer_dir, 4, 1), tiny(root / "s", tokenizer_dir, 2, 2)
        tokenizer = load_tokenizer(student)
        train_rows, valid_rows = split_rows(read_instruction_rows(dolly))
        train = encode_rows(tokenizer, train_rows, max_length=256)
        valid = encode_rows(tokenizer, valid_rows[:32], max_length=256)
        for mode in ("off_policy", "on_policy"):
            config = DistillConfig(steps=steps, batch_size=8, learning_rate=1e-3, max_length=256, device=device,
                                   mode=mode, max_new_tokens=32, eval_every=steps // 2, checkpoint_every=10,
                                   ce_weight=0.1, gradient_checkpointing=True)
            started = time.monotonic()
            result = distill(teacher, student, train, valid, root / mode, config)
            files = sorted(p.name for p in result.path.iterdir())
            report[mode] = {"metrics": result.metrics, "seconds": round(time.monotonic() - started, 1),
                            "files": files}
            assert result.metrics["validation_loss"] < result.metrics["validation_loss_before"], mode
    print(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()
