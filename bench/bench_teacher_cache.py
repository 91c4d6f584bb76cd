"""The teacher-output cache on real models (run by hand; results in docs/DISTILLATION.md, "Teacher-output cache").

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_teacher_cache.py [--work /tmp/teacher-cache] [--examples 128]

Teacher SmolLM2-135M-Instruct, student pruned from it to ~100M by the materializer (activation importance on
Dolly), Dolly's training rows, alpaca prompts, batches of 4 x at most 256 tokens, CPU, float32.

error:    the sparse loss (k = 8, 32, 64, 256, log-probabilities stored as float16; k = 64 also as float32; each
          tail model, DistillConfig.teacher_cache_tail) against the full-vocabulary loss per scored token, forward
          and reverse KL, and its gradient over all student parameters (cosine similarity, ratio of norms, norm of
          the difference relative to the full gradient's norm)
build:    build time and size on disk of a k = 64 cache over the first `--examples` training examples; a second
          build of the same key
step:     seconds per training step (accumulate_gradients + clipping + AdamW, as distill runs it) with the teacher
          forward and with the cache (each tail model), on the same batches, alternating; and the build's work on
          one such batch (teacher forward, top-k, tail) and a cache lookup
distill:  `--steps` steps of distill() with and without the cache (`--tail`; same student, data, seed): validation
          loss
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from cbd_engine.data.batches import IGNORE, bucketed_batches, collate, encode_rows, response_positions
from cbd_engine.data.rows import read_instruction_rows, split_rows
from cbd_engine.distillation.recipe import distill
from cbd_engine.distillation.step import StudentLoss, accumulate_gradients
from cbd_engine.distillation.teacher_cache import CacheSettings, TeacherCache, build_teacher_cache, teacher_top_k
from cbd_engine.io.zoo import smollm2_135m_instruct
from cbd_engine.nn.loading import hidden_states, load_model, load_tokenizer, output_head
from cbd_engine.nn.losses import LossConfig, TeacherTopK, chunked_token_losses
from cbd_engine.spec.distill_config import TEACHER_CACHE_TAILS, DistillConfig

DOLLY = Path(__file__).resolve().parents[2] / "shared" / "data" / "instruction" / "minillm_dolly_dev.jsonl"
KS = (8, 32, 64, 256)
KINDS = ("forward_kl", "reverse_kl")


def pruned_student(teacher: Path, work: Path) -> Path:
    from cbd_engine.materialization.recipe import materialize

    out = work / "student-100M"
    if not (out / "config.json").is_file():
        materialize(out, large=teacher, size="100M", calibration=str(DOLLY), dtype="float32")
    return out


def first_k(top: TeacherTopK, k: int, dtype: torch.dtype) -> TeacherTopK:
    """The top-k of a larger top-K (sorted): the dropped tokens join the tail; values rounded as stored."""
    tail = torch.cat([top.log_probs[:, k:], top.tail[:, None]], dim=-1).logsumexp(-1)
    return TeacherTopK(top.ids[:, :k], top.log_probs[:, :k].to(dtype).float(), tail.to(dtype).float())


def _flat(grads: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads]).double()  # float32 sums over 1e8 entries drift by ~1%


def error(teacher, student, batches) -> list[dict]:
    """Per (kind, tail model, k, dtype): full and sparse loss per token, and the gradient's agreement, averaged
    over batches."""
    params = [p for p in student.parameters() if p.requires_grad]
    variants = [(k, torch.float16) for k in KS] + [(64, torch.float32)]
    sums: dict[tuple, dict] = {}
    for batch in batches:
        scored = response_positions(batch.labels)
        tokens = int(scored.sum())
        with torch.no_grad():
            teacher_hidden = hidden_states(teacher, batch.input_ids, batch.attention_mask)[scored]
        widest = teacher_top_k(teacher, batch.input_ids, batch.attention_mask, scored, max(KS))
        student_hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[scored]
        no_targets = torch.full((tokens,), IGNORE)
        for kind in KINDS:
            full, _ = chunked_token_losses(student_hidden, output_head(student), no_targets, teacher_hidden,
                                           output_head(teacher), LossConfig(kind), need_ce=False)
            full_grad = _flat(torch.autograd.grad(full, params, retain_graph=True))
            for tail, k, dtype in [(tail, k, dtype) for tail in TEACHER_CACHE_TAILS for k, dtype in variants]:
                config = LossConfig(kind, teacher_cache_tail=tail)
                sparse, _ = chunked_token_losses(student_hidden, output_head(student), no_targets,
                                                 first_k(widest, k, dtype), None, config, need_ce=False)
                grad = _flat(torch.autograd.grad(sparse, params, retain_graph=True))
                row = sums.setdefault((kind, tail, k, str(dtype).removeprefix("torch.")),
                                      {"tokens": 0, "full": 0.0, "sparse": 0.0, "cosine": 0.0, "norm_ratio": 0.0,
                                       "relative_grad_error": 0.0, "batches": 0})
                row["tokens"] += tokens
                row["full"] += float(full.detach())
                row["sparse"] += float(sparse.detach())
                row["cosine"] += float(torch.nn.functional.cosine_similarity(grad, full_grad, dim=0))
                row["norm_ratio"] += float(grad.norm() / full_grad.norm())
                row["relative_grad_error"] += float((grad - full_grad).norm() / full_grad.norm())
                row["batches"] += 1
    rows = []
    for (kind, tail, k, dtype), row in sums.items():
        full, sparse = row["full"] / row["tokens"], row["sparse"] / row["tokens"]
        rows.append({"kind": kind, "tail": tail, "k": k, "dtype": dtype, "tokens": row["tokens"],
                     "full_per_token": full,
                     "sparse_per_token": sparse, "relative_value_error": (full - sparse) / full,
                     "grad_cosine": row["cosine"] / row["batches"],
                     "grad_norm_ratio": row["norm_ratio"] / row["batches"],
                     "relative_grad_error": row["relative_grad_error"] / row["batches"]})
    return rows


def build(teacher_dir: Path, examples, root: Path) -> dict:
    started = time.perf_counter()
    folder = build_teacher_cache(teacher_dir, examples, CacheSettings(64), root, batch_size=8)
    first = time.perf_counter() - started
    started = time.perf_counter()
    build_teacher_cache(teacher_dir, examples, CacheSettings(64), root, batch_size=8)
    again = time.perf_counter() - started
    info = json.loads((folder / "cache.json").read_text())
    return {"folder": str(folder), "examples": info["examples"], "positions": info["positions"],
            "bytes": info["bytes"], "bytes_per_position": info["bytes"] / info["positions"],
            "teacher_forwards": info["teacher_forwards"], "build_seconds": first,
            "build_seconds_per_1000_positions": 1000 * first / info["positions"], "second_build_seconds": again}


def steps(teacher, student, cache: TeacherCache, batches, rounds: int = 2, per_round: int = 3) -> dict:
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    cpu = torch.device("cpu")

    def step(source, batch, tail: str = "bucket") -> None:
        config = DistillConfig(device="cpu", teacher_cache_tail=tail)
        accumulate_gradients(StudentLoss(student, config.loss_config), source, [batch], config, cpu, False, False)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def build_work(batch) -> None:  # what building the cache does per batch: the teacher forward, top-k, tail
        teacher_top_k(teacher, batch.input_ids, batch.attention_mask, response_positions(batch.labels), 64)

    def cached(tail: str):  # noqa: ANN202
        return lambda batch: step(cache, batch, tail)

    variants = {"teacher_forward": lambda batch: step(teacher, batch),
                **{f"cache_{tail}": cached(tail) for tail in TEACHER_CACHE_TAILS},
                "build_work": build_work, "cache_lookup": cache.for_batch}
    for run in variants.values():  # warm-up
        run(batches[0])
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(rounds):  # alternating, so that no variant always runs on a busier machine
        for name, run in variants.items():
            started = time.perf_counter()
            for batch in batches[:per_round]:
                run(batch)
            best[name] = min(best[name], (time.perf_counter() - started) / per_round)
    per_tail = {f"seconds_per_step_cache_{tail}": best[f"cache_{tail}"] for tail in TEACHER_CACHE_TAILS}
    return {"seconds_per_step_teacher_forward": best["teacher_forward"], **per_tail,
            **{f"speedup_{tail}": best["teacher_forward"] / best[f"cache_{tail}"] for tail in TEACHER_CACHE_TAILS},
            "build_seconds_per_batch": best["build_work"],
            "cache_lookup_seconds_per_batch": best["cache_lookup"],
            "tokens_per_batch": [b.num_tokens for b in batches[:per_round]]}


def distill_both(teacher_dir: Path, student_dir: Path, train, valid, work: Path, args) -> dict:
    result = {}
    for name, k in (("teacher_forward", None), (f"cache_{args.tail}", 64)):
        config = DistillConfig(steps=args.steps, batch_size=4, learning_rate=3e-4, max_length=args.length,
                               eval_rows=args.eval_rows, device="cpu", teacher_cache=k,
                               teacher_cache_dir=str(work / "cache"), teacher_cache_tail=args.tail)
        started = time.perf_counter()
        run = distill(teacher_dir, student_dir, train, valid, work / f"distill-{name}", config)
        result[name] = {"validation_loss_before": run.metrics["validation_loss_before"],
                        "validation_loss": run.metrics["validation_loss"], "seconds": time.perf_counter() - started}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, default=Path("/tmp/teacher-cache"))
    parser.add_argument("--parts", default="error,build,step,distill")
    parser.add_argument("--examples", type=int, default=128, help="training examples cached and distilled on")
    parser.add_argument("--error-batches", type=int, default=2)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eval-rows", type=int, default=50)
    parser.add_argument("--tail", choices=TEACHER_CACHE_TAILS, default="bucket", help="the cached distill run's tail")
    args = parser.parse_args()
    parts = args.parts.split(",")
    args.work.mkdir(parents=True, exist_ok=True)
    teacher_dir = smollm2_135m_instruct()
    student_dir = pruned_student(teacher_dir, args.work)
    tokenizer = load_tokenizer(teacher_dir)
    train_rows, valid_rows = split_rows(read_instruction_rows(DOLLY))
    train = encode_rows(tokenizer, train_rows, max_length=args.length)[: args.examples]
    valid = encode_rows(tokenizer, valid_rows, max_length=args.length)
    plan = bucketed_batches([len(e) for e in train], 4, seed=0, epoch=0)
    batches = [collate([replace(train[i], index=i) for i in indices], pad_id=0) for indices in plan]
    results = {"examples": len(train), "length": args.length, "threads": torch.get_num_threads()}
    teacher = load_model(teacher_dir).eval().requires_grad_(False)
    student = load_model(student_dir).train()
    results["student_params"] = sum(p.numel() for p in student.parameters())
    if "error" in parts:
        results["error"] = error(teacher, student, batches[: args.error_batches])
        print(json.dumps(results["error"], indent=1), flush=True)
    if "build" in parts or "step" in parts:
        results["build"] = build(teacher_dir, train, args.work / "cache")
        print(json.dumps(results["build"], indent=1), flush=True)
    if "step" in parts:
        cache = TeacherCache(results["build"]["folder"])
        results["step"] = steps(teacher, student, cache, batches)
        print(json.dumps(results["step"], indent=1), flush=True)
    del teacher, student
    if "distill" in parts:
        results["distill"] = distill_both(teacher_dir, student_dir, train, valid, args.work, args)
        print(json.dumps(results["distill"], indent=1), flush=True)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
