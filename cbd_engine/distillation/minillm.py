"""MiniLLM-style policy distillation (Gu et al. 2024; the CBD paper's appendix B): the student q is trained to
minimize the sequence-level reverse KL KL(q || p) to the teacher p, by policy gradient on responses it samples.

`distill` runs it with `mode: "minillm"`; every step is one policy update (one optimizer step):
  1. rollouts, at the first of every `ppo_epochs` steps: a response to each of `batch_size` prompts, sampled token
     by token from the mixture teacher_mix p + (1 - teacher_mix) q at temperature 1, both models decoding with their
     own KV cache; a response ends with its EOS or after max_new_tokens
  2. scoring, once per batch of rollouts (no gradients): both models' log-probabilities of every sampled token,
     the rewards r_t = log p(y_t) - log q(y_t), the importance weights w_t = q(y_t) / mixture(y_t), the advantages
     and the teacher's final hidden states (kept for the regularizer)
  3. the update, per response token t (padding after EOS is never scored), averaged over the batch's tokens:
         w_t max(-A_t rho_t, -A_t clip(rho_t, 1 - ppo_clip, 1 + ppo_clip))    rho_t = q_theta(y_t) / q_old(y_t)
       + KL(q_theta(. | y<t, x) || p(. | y<t, x))                             exact, over the whole vocabulary
     plus lm_weight x the cross-entropy on `batch_size` blocks of the `lm_data` text file when one is given.

Why these terms (MiniLLM section 2.2): the gradient of the sequence-level reverse KL is
    E[sum_t grad KL_t] - E[sum_t R_{t+1} grad log q(y_t)],    R_t = sum_{t' >= t} r_t'
(KL_t with the prefix held fixed). The first sum, the single-step decomposition, is computed exactly from the
logits. The second is the policy-gradient term, with MiniLLM's length normalization R^Norm_t = R_t / (T - t + 1)
(the mean reward over the rest of the response): token t's advantage is R^Norm_{t+1}, 0 at the last token, so its
own reward, already in the exact term, is not counted twice. Sampling from the mixture is corrected by w_t,
per token as in MiniLLM; w_t <= 1 / (1 - teacher_mix). The weights multiply the clipped surrogate from outside
(the decoupled form), so at the first inner epoch (rho = 1) the gradient is exactly the weighted policy gradient.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from cbd_engine.data.batches import (
    IGNORE,
    Batch,
    Example,
    collate,
    encode_text,
    next_token_targets,
    pad_id_of,
    response_positions,
)
from cbd_engine.nn.device import autocast_for
from cbd_engine.nn.distributed import all_reduce_sum, over_ranks, unsharded_root, world
from cbd_engine.nn.generation import left_padded
from cbd_engine.nn.loading import hidden_states, output_head
from cbd_engine.nn.losses import chunked_token_losses, default_chunk, divergence
from cbd_engine.spec.distill_config import DistillConfig

# The CBD paper's settings (appendix B) and MiniLLM's for what the paper does not state (teacher_mix).
PAPER_SETTINGS = {"batch_size": 256, "ppo_epochs": 4, "ppo_clip": 0.2, "max_length": 512, "teacher_mix": 0.2,
                  "steps": 5000, "select_by": "rouge_l"}


# --- the math, on tensors -------------------------------------------------------------------------------------------


def sample_from_mixture(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float) -> torch.Tensor:
    """One token per row [...] from alpha p + (1 - alpha) q, over the two models' common vocabulary."""
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    q = F.softmax(student_logits[..., :vocab].float(), dim=-1)
    p = F.softmax(teacher_logits[..., :vocab].float(), dim=-1)
    mixture = alpha * p + (1 - alpha) * q
    return torch.multinomial(mixture.reshape(-1, vocab), 1).reshape(mixture.shape[:-1])


def log_importance_weights(rewards: torch.Tensor, alpha: float) -> torch.Tensor:
    """log w = log q - log(alpha p + (1 - alpha) q) = -log(alpha e^r + 1 - alpha), from r = log p - log q."""
    if alpha == 0:
        return torch.zeros_like(rewards)
    return -torch.logaddexp(rewards + math.log(alpha), torch.full_like(rewards, math.log1p(-alpha)))


def normalized_returns(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """R^Norm_t = (sum of r_t' over the response tokens t' >= t) / (their number), [batch, seq]; 0 off `mask`."""
    rewards = torch.where(mask, rewards, 0.0)
    total = rewards.flip(-1).cumsum(-1).flip(-1)
    count = mask.flip(-1).cumsum(-1).flip(-1)
    return torch.where(mask, total / count.clamp(min=1), 0.0)


def future_advantages(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A_t = R^Norm_{t+1}: the mean reward over the tokens after t, 0 at each response's last token ([batch, seq],
    with `mask` contiguous in each row, as responses are)."""
    returns = normalized_returns(rewards, mask)
    following = torch.zeros_like(returns)
    following[:, :-1] = returns[:, 1:]
    return torch.where(mask, following, 0.0)


def ppo_token_losses(log_q: torch.Tensor, old_log_q: torch.Tensor, advantages: torch.Tensor,
                     log_weights: torch.Tensor, clip: float) -> torch.Tensor:
    """Per-token PPO surrogate w max(-A rho, -A clip(rho)), rho = q_theta / q_old, to be minimized."""
    ratio = torch.exp(log_q - old_log_q)
    surrogate = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1 - clip, 1 + clip))
    return log_weights.exp() * surrogate


def _chunk_terms(student_hidden: torch.Tensor, actions: torch.Tensor, teacher_hidden: torch.Tensor,
                 student_head: nn.Module, teacher_head: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    student_logits = student_head(student_hidden)
    with torch.no_grad():
        teacher_logits = teacher_head(teacher_hidden)
    vocab = min(student_logits.shape[-1], teacher_logits.shape[-1])
    log_q = F.log_softmax(student_logits[:, :vocab].float(), dim=-1).gather(-1, actions[:, None])[:, 0]
    log_p = F.log_softmax(teacher_logits[:, :vocab].float(), dim=-1).gather(-1, actions[:, None])[:, 0]
    return log_q, log_p, divergence(student_logits, teacher_logits, "reverse_kl")


def token_terms(student_hidden: torch.Tensor, student_head: nn.Module, actions: torch.Tensor,
                teacher_hidden: torch.Tensor, teacher_head: nn.Module, chunk_size: int | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log q(y_t), log p(y_t), KL(q || p) at t), each [N], at N positions given both models' final hidden states
    [N, H] and the sampled tokens y_t [N]. The output layers run on a chunk of positions at a time, so [N, vocab]
    logits never exist; under activation checkpointing when gradients are on (not with gradients taken in forward,
    as losses.chunked_token_losses does: the PPO objective weighs each position only after this returns)."""
    chunk = chunk_size or default_chunk(student_hidden.device, int(student_head.weight.shape[0]))
    parts = []
    for start in range(0, max(student_hidden.shape[0], 1), chunk):  # one (empty) chunk when N = 0
        args = (student_hidden[start : start + chunk], actions[start : start + chunk],
                teacher_hidden[start : start + chunk], student_head, teacher_head)
        parts.append(checkpoint(_chunk_terms, *args, use_reentrant=False) if torch.is_grad_enabled()
                     else _chunk_terms(*args))
    log_q, log_p, kl = (torch.cat(column) for column in zip(*parts, strict=True))
    return log_q, log_p, kl


# --- rollouts ---------------------------------------------------------------------------------------------------------


def decode_step(model: nn.Module, input_ids: torch.Tensor, attention: torch.Tensor, positions: torch.Tensor,
                cache) -> tuple[torch.Tensor, object]:
    """The logits [batch, vocab] after the last input token, and the model's KV cache with `input_ids` added."""
    # transformers 5.2x renamed the cache argument from past_key_values to cache (the old name warns until 5.40)
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    output = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{name: cache})
    return output.logits[:, -1], output[name]


@torch.no_grad()
def mixture_rollouts(student: nn.Module, teacher: nn.Module, prompts: list[list[int]], alpha: float,
                     max_new_tokens: int, eos_id: int | None, pad_id: int, synced: bool = False) -> list[list[int]]:
    """Responses to `prompts` sampled token by token from alpha p + (1 - alpha) q; each ends with its EOS (kept) or
    after max_new_tokens. Prompts are left-padded, with position ids counted from each prompt's first token.
    `synced` (FSDP, where every forward gathers weights with the other ranks): every rank decodes until all ranks
    are done, padding what it samples past its own end."""
    device = next(student.parameters()).device
    steps = int(over_ranks(max_new_tokens, device)) if synced else max_new_tokens
    input_ids, attention = (tensor.to(device) for tensor in left_padded(prompts, pad_id))
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    caches: list = [None, None]
    finished = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    sampled = []
    for index in range(steps):
        student_logits, caches[0] = decode_step(student, input_ids, attention, positions, caches[0])
        teacher_logits, caches[1] = decode_step(teacher, input_ids, attention, positions, caches[1])
        token = sample_from_mixture(student_logits, teacher_logits, alpha)
        sampled.append(torch.where(finished, pad_id, token))
        if eos_id is not None:
            finished |= token == eos_id
        if index + 1 >= max_new_tokens:
            finished[:] = True
        done = bool(finished.all())
        if synced:  # every rank decodes until all are done
            done = over_ranks(float(done), device, op="min") == 1
        if done:
            break
        input_ids, positions = sampled[-1][:, None], positions[:, -1:] + 1
        attention = torch.cat([attention, torch.ones_like(attention[:, :1])], dim=1)
    responses = torch.stack(sampled, dim=1)[:, :max_new_tokens].tolist()
    return [response[: response.index(eos_id) + 1] if eos_id in response else response for response in responses]


def rollout_examples(student: nn.Module, teacher: nn.Module, examples: list[Example], tokenizer,
                     config: DistillConfig, synced: bool = False) -> list[Example]:
    """Each example's prompt followed by a response sampled from the teacher-student mixture (scored, no reference),
    within max_length."""
    prompts = [example.input_ids[: example.prompt_length] for example in examples]
    room = max(config.max_length - max(len(prompt) for prompt in prompts), 1)
    was_training = student.training
    student.eval()  # no dropout while sampling, and the KV cache stays on under gradient checkpointing
    responses = mixture_rollouts(student, teacher, prompts, config.teacher_mix, min(config.max_new_tokens, room),
                                 tokenizer.eos_token_id, pad_id_of(tokenizer), synced)
    student.train(was_training)
    return [Example(prompt + response, [IGNORE] * len(prompt) + response, len(prompt), reference=False)
            for prompt, response in zip(prompts, responses, strict=True)]


@dataclass
class ScoredRollouts:
    """One micro-batch of rollouts with what the inner epochs need, all at its N response positions."""

    batch: Batch  # prompt + sampled response, right-padded; labels on the response
    actions: torch.Tensor  # [N] the sampled tokens
    teacher_hidden: torch.Tensor  # [N, H'] the teacher's final hidden states
    old_log_q: torch.Tensor  # [N] the sampling student's log-probabilities
    rewards: torch.Tensor  # [N] log p - log q
    log_weights: torch.Tensor  # [N] log importance weights
    advantages: torch.Tensor  # [N]


@torch.no_grad()
def score_rollouts(student: nn.Module, teacher: nn.Module, batch: Batch, alpha: float,
                   chunk_size: int | None = None) -> ScoredRollouts:
    positions = response_positions(batch.labels)
    actions = next_token_targets(batch.labels)[positions]
    teacher_hidden = hidden_states(teacher, batch.input_ids, batch.attention_mask)[positions]
    student_hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[positions]
    log_q, log_p, _ = token_terms(student_hidden, output_head(student), actions, teacher_hidden, output_head(teacher),
                                  chunk_size)
    rewards = log_p - log_q
    dense = torch.zeros(positions.shape, dtype=rewards.dtype, device=rewards.device)
    dense[positions] = rewards
    return ScoredRollouts(batch, actions, teacher_hidden, log_q, rewards, log_importance_weights(rewards, alpha),
                          future_advantages(dense, positions)[positions])


def policy_loss_sums(student: nn.Module, teacher_head: nn.Module, rollouts: ScoredRollouts, clip: float,
                     chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sum of PPO surrogates, sum of single-step reverse KLs, ratios rho [N] without gradient) over the response
    tokens of one micro-batch of rollouts."""
    batch = rollouts.batch
    hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[response_positions(batch.labels)]
    log_q, _, kl = token_terms(hidden, output_head(student), rollouts.actions, rollouts.teacher_hidden, teacher_head,
                               chunk_size)
    surrogate = ppo_token_losses(log_q, rollouts.old_log_q, rollouts.advantages, rollouts.log_weights, clip)
    return surrogate.sum(), kl.sum(), torch.exp(log_q - rollouts.old_log_q).detach()


def _language_modeling_sums(student: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    positions = response_positions(batch.labels)
    hidden = hidden_states(student, batch.input_ids, batch.attention_mask)[positions]
    return chunked_token_losses(hidden, output_head(student), next_token_targets(batch.labels)[positions])


# --- the policy update of one distillation step -----------------------------------------------------------------------


def departures_from_paper(config: DistillConfig) -> list[str]:
    """The run's settings that differ from appendix B (and from MiniLLM where the paper says nothing)."""
    notes = [f"{name} {getattr(config, name)!r} (paper: {value!r})" for name, value in PAPER_SETTINGS.items()
             if getattr(config, name) != value]
    if config.max_new_tokens < config.max_length:
        notes.append(f"responses capped at max_new_tokens {config.max_new_tokens} (paper: up to the sequence length)")
    if not config.lm_data:
        notes.append("no language-modeling term (MiniLLM: a pre-training corpus, lm_data)")
    return notes


class PolicyDistillation:
    """The rollouts of the current batch of prompts and the policy update; `distill` calls `update` once per step
    (then clips the gradients and steps the optimizer) and adds `summary` to its metrics.

    Under torchrun each rank samples rollouts for its share of the prompts; the student's forwards go through
    `student_call` (distill.StudentLoss, wrapped by DDP or FSDP: forward(compute) = compute(student, loss config)),
    the update is normalized by the response tokens of all ranks, and the curve's numbers are sums over all ranks.
    `synced` (FSDP): generation keeps every rank's forwards in step."""

    def __init__(self, student: nn.Module, student_call: nn.Module, teacher: nn.Module, tokenizer,
                 config: DistillConfig, device: torch.device, bf16: bool, synced: bool = False):
        self.student, self.student_call, self.teacher = student, student_call, teacher
        self.tokenizer, self.config, self.device, self.bf16, self.synced = tokenizer, config, device, bf16, synced
        self.pad_id = pad_id_of(tokenizer)
        self.rollouts: list[ScoredRollouts] = []
        self.lm_blocks: list[Example] = []
        if config.lm_data:
            if not Path(config.lm_data).is_file():
                raise FileNotFoundError(f"lm_data {config.lm_data} does not exist")
            self.lm_blocks = encode_text(tokenizer, Path(config.lm_data).read_text(encoding="utf-8"),
                                         config.max_length).train

    def _micro_batches(self, examples: list[Example]) -> list[Batch]:
        micro = self.config.micro_batch_size or len(examples)
        return [collate(examples[i : i + micro], self.pad_id).to(self.device) for i in range(0, len(examples), micro)]

    def collect(self, examples: list[Example]) -> tuple[list[ScoredRollouts], float, float]:
        """(scored rollouts of `examples`' prompts, seconds spent sampling, seconds spent scoring)."""
        started = time.monotonic()
        with autocast_for(self.device, self.bf16):
            with unsharded_root(self.student_call):
                sampled = rollout_examples(self.student, self.teacher, examples, self.tokenizer, self.config,
                                           self.synced)
            sampling = time.monotonic() - started
            with torch.no_grad():
                scored = [self.student_call(lambda student, _, batch=batch: score_rollouts(
                    student, self.teacher, batch, self.config.teacher_mix, self.config.chunk_size))
                    for batch in self._micro_batches(sampled)]
        return scored, sampling, time.monotonic() - started - sampling

    def update(self, step: int, examples: list[Example], rng: random.Random) -> dict:
        """Backward of policy update `step`; new rollouts from `examples`' prompts at the first of every
        `ppo_epochs` updates. Returns the step's row for the loss curve (loss, divergence = mean single-step reverse
        KL, cross_entropy = the LM term's, rewards, ratios, clipping, seconds spent sampling and scoring)."""
        generation_seconds, scoring_seconds = 0.0, 0.0
        if not self.rollouts or step % self.config.ppo_epochs == 0:
            self.rollouts, generation_seconds, scoring_seconds = self.collect(examples)
        world_size = world()[1]
        tokens = all_reduce_sum([sum(r.actions.numel() for r in self.rollouts)], self.device)[0]
        surrogate_total, kl_total, ratios = 0.0, 0.0, []
        for rollouts in self.rollouts:
            with autocast_for(self.device, self.bf16):
                surrogate, kl, ratio = self.student_call(lambda student, _, rollouts=rollouts: policy_loss_sums(
                    student, output_head(self.teacher), rollouts, self.config.ppo_clip, self.config.chunk_size))
                # DDP and FSDP average gradients over ranks; the sums want them added
                ((surrogate + kl) / max(tokens, 1) * world_size).backward()
            surrogate_total, kl_total = surrogate_total + float(surrogate.detach()), kl_total + float(kl.detach())
            ratios.append(ratio)
        lm_loss = self._language_modeling(rng) if self.lm_blocks else None
        ratio = torch.cat(ratios)
        rewards = torch.cat([r.rewards for r in self.rollouts])
        clipped = float(((ratio - 1).abs() > self.config.ppo_clip).sum())
        surrogate_total, kl_total, reward_total, ratio_total, clipped, sequence_tokens = all_reduce_sum(
            [surrogate_total, kl_total, float(rewards.sum()), float(ratio.sum()), clipped,
             sum(r.batch.num_tokens for r in self.rollouts)], self.device)
        policy_loss, divergence_mean = surrogate_total / max(tokens, 1), kl_total / max(tokens, 1)
        return {"loss": policy_loss + divergence_mean + self.config.lm_weight * (lm_loss or 0.0),
                "divergence": divergence_mean, "cross_entropy": lm_loss, "policy_loss": policy_loss,
                "reward": reward_total / max(tokens, 1), "ratio": ratio_total / max(tokens, 1),
                "clip_fraction": clipped / max(tokens, 1), "response_tokens": tokens,
                "sequence_tokens": sequence_tokens, "generation_seconds": generation_seconds,
                "scoring_seconds": scoring_seconds}

    def _language_modeling(self, rng: random.Random) -> float:
        """Backward of lm_weight x the mean cross-entropy over `batch_size` random blocks of lm_data (this rank's
        share of them); returns the mean over all ranks."""
        world_size = world()[1]
        share = min(max(self.config.batch_size // world_size, 1), len(self.lm_blocks))
        batches = self._micro_batches([self.lm_blocks[i] for i in rng.sample(range(len(self.lm_blocks)), share)])
        tokens = all_reduce_sum([sum(batch.num_response_tokens for batch in batches)], self.device)[0]
        total = 0.0
        for batch in batches:
            with autocast_for(self.device, self.bf16):
                _, ce = self.student_call(lambda student, _, batch=batch: _language_modeling_sums(student, batch))
                (self.config.lm_weight * ce / max(tokens, 1) * world_size).backward()
            total += float(ce.detach())
        return all_reduce_sum([total], self.device)[0] / max(tokens, 1)

    def summary(self, history: list[dict]) -> dict:
        """Metrics of the whole run (resumed runs included, from the curve's rows): seconds spent sampling rollouts,
        scoring them and updating (the rest of each step), the sampling share of the step time, and the settings that
        depart from the paper's."""
        rows = [row for row in history if "generation_seconds" in row]
        generation = sum(row["generation_seconds"] for row in rows)
        scoring = sum(row["scoring_seconds"] for row in rows)
        total = sum(row["seconds"] for row in rows)
        return {"generation_seconds": generation, "scoring_seconds": scoring,
                "update_seconds": total - generation - scoring,
                "generation_share": generation / total if total else None,
                "departures_from_paper": departures_from_paper(self.config)}
