"""Run one tiny distillation under torchrun (used by test_ddp.py):
teacher student data out [--fsdp] [--stop-after N] [--resume] [--on-policy --rouge] [--minillm LM_TEXT]."""

from __future__ import annotations

import argparse

import torch.distributed as dist

from cbd_engine.data.batches import encode_rows
from cbd_engine.data.rows import Splits, read_instruction_rows, split_rows
from cbd_engine.distillation.recipe import distill
from cbd_engine.nn.loading import load_tokenizer
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.progress import Cancelled


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("teacher", "student", "data", "out"):
        parser.add_argument(name)
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument("--stop-after", type=int, help="cancel the run after this many steps")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--on-policy", action="store_true", help="sample half of the responses (data_mix 0.5)")
    parser.add_argument("--rouge", action="store_true", help="keep the best checkpoint by Rouge-L")
    parser.add_argument("--minillm", metavar="LM_TEXT", help="mode minillm with this language-modeling text")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.student)
    rows = split_rows(read_instruction_rows(args.data))
    data = Splits(encode_rows(tokenizer, rows.train[:32], max_length=64),
                  encode_rows(tokenizer, rows.dev[:4], max_length=64),
                  encode_rows(tokenizer, rows.validation[:4], max_length=64))
    # best-checkpoint selection and checkpoints every step, so that both run under every world size
    settings = dict(steps=4, batch_size=4, micro_batch_size=1, learning_rate=3e-3, max_length=64, device="cpu",
                    ce_weight=0.3, fsdp=args.fsdp, eval_every=1, checkpoint_every=1)
    if args.on_policy:
        settings.update(mode="on_policy", data_mix=0.5, max_new_tokens=8)
    if args.rouge:
        settings.update(select_by="rouge_l", rouge_rows=2, rouge_max_new_tokens=4)
    if args.minillm:  # checkpoints fall between batches of rollouts
        settings.update(mode="minillm", ce_weight=0.0, ppo_epochs=2, checkpoint_every=2, max_new_tokens=48,
                        lm_data=args.minillm)
    config = DistillConfig(**settings)
    steps_seen = {"n": 0}

    def should_stop() -> bool:
        steps_seen["n"] += 1
        return args.stop_after is not None and steps_seen["n"] > args.stop_after

    try:
        distill(args.teacher, args.student, data, args.out, config, resume=args.resume,
                should_stop=should_stop)
    except Cancelled:
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
