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

Memory: `chunked_token_losses` takes hidden states of the scored positions only and applies each model's output
layer to `chunk_size` positions at a time under activation checkpointing, so logits exist for one chunk at a time
and are recomputed in backward. Full [batch, sequence, vocabulary] logits of both models never exist.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cbd_engine.distill_config import DIVERGENCES


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
    d = log_p - log_q
    if kind == "forward_kl":
        return (log_p.exp() * d).sum(-1)
    if kind == "reverse_kl":
        return -(log_q.exp() * d).sum(-1)
    if kind == "jsd":
        if not 0 < beta < 1:
            raise ValueError(f"jsd needs 0 < beta < 1 (use forward_kl or reverse_kl for the ends), got {beta}")
        log_m = _log_mixture_minus_log_q(d, beta)  # log m - log q
        kl_p_m = (log_p.exp() * (d - log_m)).sum(-1)
        kl_q_m = -(log_q.exp() * log_m).sum(-1)
        return beta * kl_p_m + (1 - beta) * kl_q_m
    if not 0 <= skew < 1:
        raise ValueError(f"skew must be in [0, 1), got {skew}")
    if kind == "skew_forward_kl":  # m = skew p + (1 - skew) q
        return (log_p.exp() * (d - _log_mixture_minus_log_q(d, skew))).sum(-1)
    # skew_reverse_kl: m = skew q + (1 - skew) p
    return -(log_q.exp() * _log_mixture_minus_log_q(d, 1 - skew)).sum(-1)


@dataclass(frozen=True)
class LossConfig:
    kind: str = "reverse_kl"
    beta: float = 0.5  # jsd
    skew: float = 0.1  # skew_*_kl
    temperature: float = 1.0
    chunk_size: int | None = None  # scored positions whose logits exist at once; None: default_chunk()


# Logit elements per chunk: 8M (32 MiB in float32) keeps the loss's peak well under a quarter of full logits at
# vocab 49152 and sequence 512, while each chunk's matmul stays large enough to run at full speed on a CPU.
CHUNK_ELEMENTS = 2**23
# On accelerators every chunk is a kernel launch and a recomputation in backward: measured on an H200 (SmolLM2 shape,
# batch 32 x 1024, docs/DISTILLATION.md), 8M-element chunks ran the step at 0.65x the naive full-logits step's
# speed, 100M-element ones (~2048 positions) at 0.94x, with the step's peak memory still 0.60x the naive one's.
ACCELERATOR_CHUNK_ELEMENTS = 100 * 2**20


def default_chunk(device: torch.device, vocab: int) -> int:
    """Scored positions per chunk when the config does not say."""
    return max(1, (CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS) // vocab)


Head = Callable[[torch.Tensor], torch.Tensor]


def chunked_token_losses(student_hidden: torch.Tensor, student_head: Head, targets: torch.Tensor,
                         teacher_hidden: torch.Tensor | None = None, teacher_head: Head | None = None,
                         config: LossConfig = LossConfig(), need_ce: bool = True,
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of divergences, sum of cross-entropies) over N scored positions.

    student_hidden [N, H] (requires grad), targets [N] (the reference next tokens; used by the cross-entropy term),
    teacher_hidden [N, H'] (no grad) or None for cross-entropy only. Sums, not means: the caller divides by the
    global number of scored tokens so that micro-batching and data parallelism do not change the gradient.
    """
    zero = student_hidden.sum() * 0.0  # keeps the graph (and finite zero gradients) when nothing is scored
    total_div, total_ce = zero, zero
    chunk = config.chunk_size or default_chunk(student_hidden.device, _vocab_size(student_head))
    for start in range(0, student_hidden.shape[0], chunk):
        stop = start + chunk
        t_hidden = teacher_hidden[start:stop] if teacher_hidden is not None else None
        div, ce = checkpoint(_chunk_losses, student_hidden[start:stop], targets[start:stop], t_hidden,
                             student_head, teacher_head, config, need_ce, use_reentrant=False)
        total_div, total_ce = total_div + div, total_ce + ce
    return total_div, total_ce


def _vocab_size(head: Head) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None else 65536


def _chunk_losses(s_hidden: torch.Tensor, targets: torch.Tensor, t_hidden: torch.Tensor | None,
                  student_head: Head, teacher_head: Head | None, config: LossConfig, need_ce: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    s_logits = student_head(s_hidden)
    ce = F.cross_entropy(s_logits.float(), targets, reduction="sum") if need_ce else s_logits.sum() * 0.0
    if t_hidden is None or teacher_head is None:
        return s_logits.sum() * 0.0, ce
    with torch.no_grad():
        t_logits = teacher_head(t_hidden)
    return divergence(s_logits, t_logits, config.kind, config.beta, config.skew, config.temperature).sum(), ce


def eager_token_losses(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None,
                       config: LossConfig = LossConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """The same sums from full logits [N, V]: the reference the chunked path is tested (and benchmarked) against."""
    ce = F.cross_entropy(student_logits.float(), targets, reduction="sum")
    if teacher_logits is None:
        return student_logits.sum() * 0.0, ce
    div = divergence(student_logits, teacher_logits, config.kind, config.beta, config.skew, config.temperature)
    return div.sum(), ce
