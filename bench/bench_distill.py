"""Speed and memory of the distillation step against bare PyTorch (run by hand; results in docs/DISTILLATION.md).

    .venv/bin/python bench/bench_distill.py speed  [--device cpu|cuda] [--batch 4] [--length 256] [--steps 10]
    .venv/bin/python bench/bench_distill.py memory [--device cpu|cuda] [--batch 4] [--length 512]

speed: tokens/s of one engine step (accumulate_gradients + clip + AdamW, as `distill` runs it) against a bare loop
that does the same forward/backward/loss with full logits (teacher and student forward, reverse KL over the
response tokens, backward, clip, AdamW), SmolLM2-135M-Instruct as teacher and a 24-layer copy of it as student.
memory: peak memory of the loss alone (forward + backward from hidden states, vocab 49152, SmolLM2's output layer)
for the engine's chunked loss and a naive full-logits KL. On CUDA: torch.cuda.max_memory_allocated; on CPU: the
growth of the process's peak RSS, each variant in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from cbd_engine.data.batches import IGNORE, Example, collate, response_positions
from cbd_engine.distillation.step import StudentLoss, accumulate_gradients
from cbd_engine.distillation.teacher_cache import CacheSettings, TeacherCache, build_teacher_cache
from cbd_engine.io.zoo import smollm2_135m_instruct
from cbd_engine.nn.loading import load_model
from cbd_engine.nn.losses import LossConfig, chunked_token_losses
from cbd_engine.spec.distill_config import DistillConfig


def synthetic_examples(batch: int, length: int, vocab: int, seed: int = 0) -> list[Example]:
    """Random tokens; the second half of each row is the scored response, as in a typical instruction row."""
    generator = torch.Generator().manual_seed(seed)
    prompt = length // 2
    rows = torch.randint(0, vocab, (batch, length), generator=generator).tolist()
    return [Example(ids, [IGNORE] * prompt + ids[prompt:], prompt, index=i) for i, ids in enumerate(rows)]


def cached_teacher(teacher, examples: list[Example], device: torch.device, bf16: bool, top_k: int,
                   work: Path) -> TeacherCache:
    """The teacher's top-k over the examples, built once as `distill` does with `teacher_cache: top_k`; the step
    then runs no teacher forward (and holds no teacher in memory)."""
    teacher.save_pretrained(work / "teacher")
    folder = build_teacher_cache(work / "teacher", examples, CacheSettings(top_k, bf16=bf16), work, device=device,
                                 batch_size=len(examples))
    return TeacherCache(folder)


CONFIG = Path(__file__).with_name("configs") / "smollm2-135m.json"


def smollm2(device: torch.device, random_weights: bool):
    """SmolLM2-135M-Instruct, or its architecture with random weights (speed does not depend on the values; used
    on machines without the checkpoint)."""
    if not random_weights:
        return load_model(smollm2_135m_instruct(), device)
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(CONFIG.read_text()))
    return AutoModelForCausalLM.from_config(config).to(device)


def models(device: torch.device, random_weights: bool = False, student_layers: int = 24):
    teacher = smollm2(device, random_weights).eval().requires_grad_(False)
    student = smollm2(device, random_weights).train()
    student.model.layers = student.model.layers[:student_layers]  # 24: a smaller student, as a chain's first step
    student.config.num_hidden_layers = student_layers
    return teacher, student


def engine_step(student_loss, teacher, student, optimizer, batch, config, device, bf16) -> None:
    accumulate_gradients(student_loss, teacher, [batch], config, device, bf16, ce_only=False)
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bare_step(teacher, student, optimizer, batch, device, bf16) -> None:
    """What one would write by hand: full logits of both models, reverse KL on the response tokens."""
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        student_logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        mask = response_positions(batch.labels)
        log_q = F.log_softmax(student_logits[mask].float(), -1)
        log_p = F.log_softmax(teacher_logits[mask].float(), -1)
        loss = (log_q.exp() * (log_q - log_p)).sum(-1).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


VARIANTS = ("naive", "engine", "engine-compiled", "engine-ckpt", "engine-compiled-ckpt", "engine-cached",
            "engine-compiled-cached")


def speed_one(variant: str, args: argparse.Namespace) -> dict:
    """tokens/s and the whole step's peak memory of one variant, in this process: `naive` is bare_step; `engine` is
    the project's step, optionally with the decoders compiled (DistillConfig.compile), activation checkpointing
    (DistillConfig.gradient_checkpointing) and the teacher cache (DistillConfig.teacher_cache, built before the
    timing: over a data set's epochs the build is one teacher forward per example), as `distill` sets them up."""
    from cbd_engine.nn.loading import compile_decoders

    device = torch.device(args.device)
    bf16 = device.type == "cuda"
    teacher, student = models(device, args.random_weights, args.student_layers)
    examples = synthetic_examples(args.batch, args.length, teacher.config.vocab_size)
    batch = collate(examples, pad_id=0).to(device)
    config = DistillConfig(device="cpu" if device.type == "cpu" else "gpu", chunk_size=args.chunk_size)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-5)
    if variant == "naive":
        return timed(lambda: bare_step(teacher, student, optimizer, batch, device, bf16), args, device)
    result = {}
    with tempfile.TemporaryDirectory() as work:  # the cached variants' teacher and cache
        if "cached" in variant:
            started = time.perf_counter()
            teacher = cached_teacher(teacher, examples, device, bf16, args.top_k, Path(work))
            result["cache_build_seconds"] = time.perf_counter() - started
        if "ckpt" in variant:
            student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if "compiled" in variant:
            compile_decoders(student, teacher)
        student_loss = StudentLoss(student, config.loss_config)
        return {**result, **timed(lambda: engine_step(student_loss, teacher, student, optimizer, batch, config,
                                                      device, bf16), args, device)}


def timed(step: Callable[[], None], args: argparse.Namespace, device: torch.device) -> dict:
    """Warm-up steps (compilation included), then tokens/s over the timed steps and, on CUDA, their peak memory."""
    started = time.perf_counter()
    for _ in range(args.warmup):
        step()
    _sync(device)
    result = {"warmup_seconds": time.perf_counter() - started}
    if device.type == "cuda":  # the whole step's peak: weights, optimizer state, activations, logits
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    result["tokens_per_second"] = args.batch * args.length * args.steps / (time.perf_counter() - started)
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def speed(args: argparse.Namespace) -> dict:
    """Each variant in a fresh process (clean memory peaks, no compiled code shared), naive first."""
    result = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "batch": args.batch,
              "length": args.length, "steps": args.steps, "chunk_size": args.chunk_size,
              "student_layers": args.student_layers, "random_weights": args.random_weights}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "speed-one", variant, "--device", args.device, "--batch",
                   str(args.batch), "--length", str(args.length), "--steps", str(args.steps), "--warmup",
                   str(args.warmup), "--student-layers", str(args.student_layers), "--top-k", str(args.top_k)]
        command += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
        command += ["--random-weights"] if args.random_weights else []
        output = subprocess.run(command, text=True, capture_output=True)
        if output.returncode:
            result[variant] = {"error": output.stderr[-2000:]}
            continue
        result[variant] = json.loads(output.stdout.strip().splitlines()[-1])
        naive = result.get("naive", {})
        if "tokens_per_second" in naive and variant != "naive":
            result[variant]["speed_vs_naive"] = result[variant]["tokens_per_second"] / naive["tokens_per_second"]
            if "peak_gib" in naive:
                result[variant]["memory_vs_naive"] = result[variant]["peak_gib"] / naive["peak_gib"]
        print(json.dumps({variant: result[variant]}), flush=True)
    return result


def loss_peak(variant: str, args: argparse.Namespace) -> int:
    """Peak bytes of one loss forward + backward from hidden states (inputs excluded)."""
    device = torch.device(args.device)
    torch.manual_seed(0)
    vocab, hidden = 49152, 576
    s_head = torch.nn.Linear(hidden, vocab, bias=False).to(device)
    t_head = torch.nn.Linear(hidden, vocab, bias=False).to(device).requires_grad_(False)
    n = args.batch * args.length
    s_hidden = torch.randn(n, hidden, device=device, requires_grad=True)
    t_hidden = torch.randn(n, hidden, device=device)
    targets = torch.randint(0, vocab, (n,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if variant == "chunked":
        div, _ = chunked_token_losses(s_hidden, s_head, targets, t_hidden, t_head,
                                      LossConfig(chunk_size=args.chunk_size), need_ce=False)
        div.backward()
    else:
        log_q = F.log_softmax(s_head(s_hidden), -1)
        with torch.no_grad():
            log_p = F.log_softmax(t_head(t_hidden), -1)
        (log_q.exp() * (log_q - log_p)).sum().backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def memory(args: argparse.Namespace) -> dict:
    result = {"device": args.device, "batch": args.batch, "length": args.length, "vocab": 49152,
              "chunk_size": args.chunk_size}
    for variant in ("chunked", "naive"):
        if args.device == "cuda":
            result[f"{variant}_peak_mib"] = loss_peak(variant, args) / 2**20
        else:  # a fresh process per variant: RSS peaks never go down
            command = [sys.executable, __file__, "memory-one", variant, "--device", args.device, "--batch",
                       str(args.batch), "--length", str(args.length)]
            command += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
            # large blocks straight from mmap and back on free: RSS then follows live tensors instead of what glibc's
            # arenas keep around, which otherwise makes CPU peaks depend on allocation order more than on the loss
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
            output = subprocess.check_output(command, text=True, env=env)
            result[f"{variant}_peak_mib"] = float(output.split()[-1]) / 2**20
    result["chunked_vs_naive"] = result["chunked_peak_mib"] / result["naive_peak_mib"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("speed", "speed-one", "memory", "memory-one"))
    parser.add_argument("variant", nargs="?")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=None)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--random-weights", action="store_true", help="SmolLM2's architecture, random weights")
    parser.add_argument("--chunk-size", type=int, default=LossConfig().chunk_size)
    parser.add_argument("--student-layers", type=int, default=24, help="30: a student of the teacher's shape")
    parser.add_argument("--top-k", type=int, default=64, help="the cached variants' teacher_cache")
    parser.add_argument("--variants", default="naive,engine", help=f"speed: comma-separated, of {', '.join(VARIANTS)}")
    args = parser.parse_args()
    if args.what == "speed-one":
        args.length = args.length or 256
        print(json.dumps(speed_one(args.variant, args)))
        return
    if args.what == "memory-one":
        args.length = args.length or 512
        print(loss_peak(args.variant, args))
        return
    if args.what == "speed":
        args.length = args.length or 256
        print(json.dumps(speed(args), indent=1))
    else:
        args.length = args.length or 512
        print(json.dumps(memory(args), indent=1))


if __name__ == "__main__":
    main()
