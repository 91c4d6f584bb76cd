"""Token-level divergences between teacher and student, computed in chunks straight from hidden states.

Notation: p = teacher distribution, q = student distribution over the vocabulary at one position, d = log p - log q.

    forward_kl       KL(p || q)      = sum p d                         mode-covering (classic KD)
    reverse_kl       KL(q || p)      = -sum q d                        mode-seeking (MiniLLM, the CBD paper)
    jsd (beta)       beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
    skew_forward_kl  KL(p || a p + (1 - a) q)                          (DistiLLM, a = skew)
    skew_reverse_kl  KL(q || a q + (1 - a) p)

Everything is written in terms of d, and log m - log q = log(beta e^d + 1 - beta) is evaluated with expm1/log1p on
whichever side of 0 d lies; so identical distributions give exactly d = 0 and a divergence of exactly 0 (not
merely a zero gradient), and large |d| never overflows.

Memory and time: `chunked_token_losses` takes hidden states of the scored positions only and applies each model's
output layer to `chunk_size` positions at a time, so logits exist for one chunk at a time and full [batch, sequence,
vocabulary] logits of both models never exist. Each chunk's gradients with respect to the student's hidden states and
output layer are taken right there, in the forward pass (as Liger's fused linear cross-entropy does), and backward
only scales them: the logits of both models are computed once, not again in backward as activation checkpointing
would, which costs 4 vocabulary-wide matmuls per chunk instead of 6.

Sparse teacher (`TeacherTopK`, from distillation/teacher_cache.py): the teacher's distribution kept as its k most likely
tokens and the log of the remaining (tail) mass; `sparse_divergence` compares the student with it under one of two
tail models (DistillConfig.teacher_cache_tail), both equal to the full divergence when k covers the vocabulary:
    bucket   the tail is one token for both models (k + 1 buckets). Merging tokens never increases a divergence (data
             processing inequality): a lower bound, exact when the teacher's tail has the student's shape.
    uniform  the teacher's tail mass is spread evenly over the other V - k tokens and compared with the student's
             full distribution (its spread inside the tail counts); exact when the teacher's tail is uniform.
Which one is closer depends on the loss and k (docs/DISTILLATION.md, "Teacher-output cache").
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbd_engine.spec.distill_config import DIVERGENCES, TEACHER_CACHE_TAILS, LossConfig


def _log_mixture_minus_log_q(d: torch.Tensor, beta: float) -> torch.Tensor:
    """log(beta p + (1 - beta) q) - log q as a function of d = log p - log q; exact 0 at d = 0, no overflow."""
    below = d.clamp(max=0)
    above = d.clamp(min=0)
    left = torch.log1p(beta * torch.expm1(below))  # d <= 0: log(1 + beta (e^d - 1))
    right = above + torch.log1p((1 - beta) * torch.expm1(-above))  # d > 0: d + log(1 + (1 - beta)(e^-d - 1))
    return torch.where(d <= 0, left, right)


def _log_softmax(logits: torch.Tensor, dtype: torch.dtype, temperature: float) -> torch.Tensor:
    # no scaled copy at temperature 1: at vocabulary width every temporary counts toward the loss's peak memory
    logits = logits.to(dtype)
    return F.log_softmax(logits if temperature == 1 else logits / temperature, dim=-1)


def _forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, d: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    return (log_p.exp() * d).sum(-1)


def _reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, d: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    return -(log_q.exp() * d).sum(-1)


def _jsd(log_p: torch.Tensor, log_q: torch.Tensor, d: torch.Tensor, beta: float, skew: float) -> torch.Tensor:
    if not 0 < beta < 1:
        raise ValueError(f"jsd needs 0 < beta < 1 (use forward_kl or reverse_kl for the ends), got {beta}")
    log_m = _log_mixture_minus_log_q(d, beta)  # log m - log q
    return beta * (log_p.exp() * (d - log_m)).sum(-1) + (1 - beta) * -(log_q.exp() * log_m).sum(-1)


def _skew(skew: float) -> float:
    if not 0 <= skew < 1:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    return skew


def _skew_forward_kl(log_p: torch.Tensor, log_q: torch.Tensor, d: torch.Tensor, beta: float,
                     skew: float) -> torch.Tensor:  # m = skew p + (1 - skew) q
    return (log_p.exp() * (d - _log_mixture_minus_log_q(d, _skew(skew)))).sum(-1)


def _skew_reverse_kl(log_p: torch.Tensor, log_q: torch.Tensor, d: torch.Tensor, beta: float,
                     skew: float) -> torch.Tensor:  # m = skew q + (1 - skew) p
    return -(log_q.exp() * _log_mixture_minus_log_q(d, 1 - _skew(skew))).sum(-1)


# The registry of divergences, by the names of spec/distill_config.py DIVERGENCES (which the API and the CLI offer):
# a new loss is a function here and its name there (tests/test_losses.py checks that the two agree).
DIVERGENCE_FUNCTIONS = {"forward_kl": _forward_kl, "reverse_kl": _reverse_kl, "jsd": _jsd,
                        "skew_forward_kl": _skew_forward_kl, "skew_reverse_kl": _skew_reverse_kl}


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str = "reverse_kl",
               beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0) -> torch.Tensor:
    """Per-position divergence [...] between the softmaxes of [..., vocab] logits, computed in float32 (or float64
    when given float64). Only the common vocabulary is compared: a teacher whose output layer is padded past the
    tokenizer (Qwen: 152064 rows for 151936 or fewer tokens) is cut to the student's width, and vice versa."""
    if kind not in DIVERGENCES:
        raise ValueError(f"loss must be one of {DIVERGENCES}, got {kind!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_q = _log_softmax(student_logits[..., :vocab], dtype, temperature)
    log_p = _log_softmax(teacher_logits[..., :vocab], dtype, temperature)
    return DIVERGENCE_FUNCTIONS[kind](log_p, log_q, log_p - log_q, beta, skew)


# The log-mass of an empty tail (top-k covering the whole vocabulary): finite, so log-ratios stay defined, and
# e^-10000 is 0 in every float format.
EMPTY_TAIL = -1e4


@dataclass(frozen=True)
class TeacherTopK:
    """The teacher's distribution at N positions: its k most likely tokens, and the mass of all others (the tail)."""

    ids: torch.Tensor  # [N, k] token ids
    log_probs: torch.Tensor  # [N, k] their log-probabilities (at the distillation temperature)
    tail: torch.Tensor  # [N] log of the probability of all other tokens

    def __getitem__(self, rows: slice) -> TeacherTopK:
        return TeacherTopK(self.ids[rows], self.log_probs[rows], self.tail[rows])

    def __len__(self) -> int:
        return self.ids.shape[0]

    def to(self, device: torch.device | str) -> TeacherTopK:
        return TeacherTopK(self.ids.to(device), self.log_probs.to(device), self.tail.to(device))

    def uniform_tail_logits(self, vocab: int, temperature: float = 1.0, dtype: torch.dtype = torch.float32,
                            ) -> torch.Tensor:
        """Logits [N, vocab] whose softmax at `temperature` is the teacher with its tail mass spread evenly over the
        vocab - k tokens outside its top k. Scaled by the temperature at the k + 1 values, not the [N, vocab] row."""
        spread = (self.tail.to(dtype) - math.log(max(vocab - self.ids.shape[-1], 1))) * temperature
        logits = spread[:, None].repeat(1, vocab)
        return logits.scatter_(-1, self.ids.long(), self.log_probs.to(dtype) * temperature)


def bucket_log_probs(logits: torch.Tensor, ids: torch.Tensor, temperature: float = 1.0,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probabilities [N, k] of tokens `ids`, log of the remaining mass [N]) of softmax(logits / temperature).
    The tail is a log-sum-exp over the other tokens rather than log(1 - sum of the top k): exact even when the top k
    hold all but 1e-9 of the mass, where 1 - sum would cancel to noise."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_probs = _log_softmax(logits, dtype, temperature)
    tail = log_probs.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return log_probs.gather(-1, ids), tail.clamp(min=EMPTY_TAIL)


def sparse_divergence(student_logits: torch.Tensor, teacher: TeacherTopK, kind: str = "reverse_kl",
                      beta: float = 0.5, skew: float = 0.1, temperature: float = 1.0, tail: str = "bucket",
                      ) -> torch.Tensor:
    """Per-position divergence [N] between the student and a top-k teacher, its tail modelled as `tail` says:
    "bucket": over the teacher's k + 1 buckets, the student's being its probabilities of the teacher's top-k tokens
    and the rest of its mass, e.g. forward KL = sum_topk p (log p - log q) + p_tail (log p_tail - log q_tail);
    "uniform": over the whole vocabulary against `TeacherTopK.uniform_tail_logits` (one more [N, V] tensor, as the
    teacher's logits are in the full path). The teacher's log-probabilities were taken at `temperature` when cached;
    the student's are taken at it here. Student logits [N, V] must span the teacher's vocabulary (the cache is
    refused for another width)."""
    if tail not in TEACHER_CACHE_TAILS:
        raise ValueError(f"tail must be one of {TEACHER_CACHE_TAILS}, got {tail!r}")
    if tail == "uniform":
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        teacher_logits = teacher.uniform_tail_logits(student_logits.shape[-1], temperature, dtype)
        return divergence(student_logits, teacher_logits, kind, beta, skew, temperature)
    student_top, student_tail = bucket_log_probs(student_logits, teacher.ids.long(), temperature)
    log_q = torch.cat([student_top, student_tail[:, None]], dim=-1)
    log_p = torch.cat([teacher.log_probs, teacher.tail[:, None]], dim=-1).to(log_q.dtype)
    return divergence(log_q, log_p, kind, beta, skew)


# Logit elements per chunk: 8M (32 MiB in float32) keeps the loss's peak well under a quarter of full logits at
# vocab 49152 and sequence 512, while each chunk's matmul stays large enough to run at full speed on a CPU.
CHUNK_ELEMENTS = 2**23
# On accelerators small chunks leave the GPU idle between kernel launches: measured on an H200 (SmolLM2 shape, batch
# 32 x 1024, docs/DISTILLATION.md; the loss then still recomputed each chunk in backward), 8M-element chunks ran the
# step at 0.65x the naive full-logits step's speed, 100M-element ones (~2048 positions) at 0.94x, with the step's
# peak memory still 0.60x the naive one's.
ACCELERATOR_CHUNK_ELEMENTS = 100 * 2**20


def default_chunk(device: torch.device, vocab: int) -> int:
    """Scored positions per chunk when the config does not say."""
    return max(1, (CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS) // vocab)


Head = nn.Module  # an output layer: hidden states [N, H] -> logits [N, V]


def chunked_token_losses(student_hidden: torch.Tensor, student_head: Head, targets: torch.Tensor,
                         teacher_hidden: torch.Tensor | TeacherTopK | None = None, teacher_head: Head | None = None,
                         config: LossConfig = LossConfig(), need_ce: bool = True,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of divergences, sum of cross-entropies) over N scored positions, both differentiable.

    student_hidden [N, H] (requires grad), targets [N] (the reference next tokens; used by the cross-entropy term),
    teacher_hidden [N, H'] (no grad), or the teacher's cached top-k at the N positions (TeacherTopK: no teacher_head,
    `sparse_divergence`), or None for cross-entropy only. Sums, not means: the caller divides by the
    global number of scored tokens so that micro-batching and data parallelism do not change the gradient.
    """
    chunk = config.chunk_size or default_chunk(student_hidden.device, int(student_head.weight.shape[0]))
    computes_divergence = teacher_hidden is not None and (teacher_head is not None
                                                           or isinstance(teacher_hidden, TeacherTopK))

    def losses_at(hidden: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        t_hidden = teacher_hidden[start:stop] if computes_divergence else None
        return _chunk_losses(student_head(hidden), targets[start:stop], t_hidden, teacher_head, config, need_ce)

    params = [p for p in student_head.parameters() if p.requires_grad]
    return _ChunkedHeadLosses.apply(losses_at, chunk, (computes_divergence, need_ce), student_hidden, *params)


class _ChunkedHeadLosses(torch.autograd.Function):
    """Two loss sums over chunks of positions. Forward takes, chunk by chunk, the gradients of each live sum with
    respect to the hidden states and the output layer's parameters (the logits then die with the chunk); backward
    multiplies them by the incoming gradients. The parameters are inputs, so DDP and FSDP see their gradients arrive
    as with any other operation."""

    @staticmethod
    def forward(ctx, losses_at, chunk: int, live: tuple[bool, bool], hidden: torch.Tensor, *params: torch.Tensor):
        leaves_need_grad = ctx.needs_input_grad[3:]
        live = tuple(is_live and any(leaves_need_grad) for is_live in live)
        dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        sums = [torch.zeros((), dtype=dtype, device=hidden.device) for _ in live]
        grads = [_zero_grads(hidden, params) if is_live else None for is_live in live]
        for start in range(0, hidden.shape[0], chunk):
            stop = start + chunk
            with torch.enable_grad():
                leaf = hidden[start:stop].detach().requires_grad_(leaves_need_grad[0])
                values = losses_at(leaf, start, stop)
                for index, value in enumerate(values):
                    sums[index] += value.detach()
                    if live[index]:
                        _add_chunk_grads(grads[index], value, leaf, params, start, stop, retain=index == 0 and live[1])
        ctx.layout = [grad is not None for grad in grads]
        ctx.save_for_backward(*[tensor for grad in grads if grad is not None for tensor in grad])
        ctx.param_dtypes = [p.dtype for p in params]
        return sums[0], sums[1]

    @staticmethod
    def backward(ctx, grad_div: torch.Tensor, grad_ce: torch.Tensor):
        saved, size = list(ctx.saved_tensors), len(ctx.param_dtypes) + 1
        total: list[torch.Tensor | None] = [None] * size
        for is_live, upstream in zip(ctx.layout, (grad_div, grad_ce), strict=True):
            if not is_live:
                continue
            stored, saved = saved[:size], saved[size:]
            total = [grad * upstream if sum_ is None else sum_ + grad * upstream
                     for sum_, grad in zip(total, stored, strict=True)]
        hidden_grad, *param_grads = total
        param_grads = [None if grad is None else grad.to(dtype)
                       for grad, dtype in zip(param_grads, ctx.param_dtypes, strict=True)]
        return None, None, None, hidden_grad, *param_grads


def _zero_grads(hidden: torch.Tensor, params: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
    # parameter gradients summed over chunks in at least float32 (a bf16 model too); cast back once in backward
    return [torch.zeros_like(hidden)] + [torch.zeros_like(p, dtype=torch.promote_types(p.dtype, torch.float32))
                                         for p in params]


def _add_chunk_grads(grads: list[torch.Tensor], value: torch.Tensor, leaf: torch.Tensor,
                     params: tuple[torch.Tensor, ...], start: int, stop: int, retain: bool) -> None:
    inputs = [leaf, *params] if leaf.requires_grad else list(params)
    chunk_grads = torch.autograd.grad(value, inputs, retain_graph=retain, allow_unused=True)
    if not leaf.requires_grad:
        chunk_grads = (None, *chunk_grads)
    if chunk_grads[0] is not None:
        grads[0][start:stop] = chunk_grads[0]
    for total, grad in zip(grads[1:], chunk_grads[1:], strict=True):
        if grad is not None:
            total += grad


def _chunk_losses(s_logits: torch.Tensor, targets: torch.Tensor, t_hidden: torch.Tensor | TeacherTopK | None,
                  teacher_head: Head | None, config: LossConfig, need_ce: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ce = _cross_entropy_sum(s_logits, targets) if need_ce else s_logits.sum() * 0.0
    if isinstance(t_hidden, TeacherTopK):
        div = sparse_divergence(s_logits, t_hidden, config.kind, config.beta, config.skew, config.temperature,
                                config.teacher_cache_tail)
        return div.sum(), ce
    if t_hidden is None or teacher_head is None:
        return s_logits.sum() * 0.0, ce
    with torch.no_grad():
        t_logits = teacher_head(t_hidden)
    return divergence(s_logits, t_logits, config.kind, config.beta, config.skew, config.temperature).sum(), ce


def _cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """In float32 at least (bf16 logits are upcast; float64 stays float64, as the divergences do)."""
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="sum")


def eager_token_losses(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                       config: LossConfig = LossConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums from full logits [N, V]: the reference the chunked path is tested (and benchmarked) against."""
    ce = _cross_entropy_sum(student_logits, targets)
    if teacher_logits is None:
        return student_logits.sum() * 0.0, ce
    div = divergence(student_logits, teacher_logits, config.kind, config.beta, config.skew, config.temperature)
    return div.sum(), ce
