"""MiniLLM mode: the policy-gradient math on toy distributions, rollouts with KV caches, and the mode inside distill
(tiny models: a teacher equal to the student, a falling loss, masking after EOS, resume)."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from conftest import SHARED_DATA
from distill_helpers import assert_resumes_to_the_same_weights, dolly_examples, tiny_with_tokenizer

from cbd_engine.data.batches import IGNORE, Batch, collate
from cbd_engine.distillation.minillm import (
    PolicyDistillation,
    decode_step,
    future_advantages,
    log_importance_weights,
    mixture_rollouts,
    normalized_returns,
    policy_loss_sums,
    ppo_token_losses,
    sample_from_mixture,
    score_rollouts,
)
from cbd_engine.distillation.recipe import distill
from cbd_engine.distillation.step import StudentLoss
from cbd_engine.io.checkpoint import copy_side_files
from cbd_engine.nn.loading import load_model, load_tokenizer
from cbd_engine.nn.losses import divergence
from cbd_engine.spec.distill_config import DistillConfig

MAX_LENGTH = 64
SHAKESPEARE = SHARED_DATA / "text" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A random student and a teacher that is the student with 6x sharper logits (its final norm scaled): a target
    the student can reach within a few steps (KL(q || p) about 0.2 at first), unlike another random network."""
    root = tmp_path_factory.mktemp("minillm")
    student = tiny_with_tokenizer(root / "student", seed=2, num_hidden_layers=2)
    teacher = load_model(student)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(6.0)
    teacher.save_pretrained(root / "teacher")
    copy_side_files(student, root / "teacher")
    return root / "teacher", student


@pytest.fixture(scope="module")
def data(pair):
    return dolly_examples(pair[1], max_length=MAX_LENGTH)


def _config(**overrides) -> DistillConfig:
    settings = dict(mode="minillm", batch_size=4, max_length=MAX_LENGTH, max_new_tokens=12, ppo_epochs=2,
                    learning_rate=3e-3, device="cpu")
    return DistillConfig(**{**settings, **overrides})


def _toy(vocab: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=generator, dtype=torch.float64) * 1.5, \
        torch.randn(vocab, generator=generator, dtype=torch.float64) * 1.5


# --- the math on toy vocabularies -------------------------------------------------------------------------------------


def test_monte_carlo_reward_over_student_samples_converges_to_the_exact_reverse_kl():
    student_logits, teacher_logits = _toy()
    log_q, log_p = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    exact = float(divergence(student_logits, teacher_logits, "reverse_kl"))
    torch.manual_seed(0)
    samples = sample_from_mixture(student_logits.expand(200_000, -1), teacher_logits.expand(200_000, -1), alpha=0.0)
    estimate = log_q[samples] - log_p[samples]  # minus the reward r
    error = float(estimate.std()) / len(samples) ** 0.5
    assert exact > 0.3
    assert abs(float(estimate.mean()) - exact) < 4 * error
    assert abs(float(estimate[:100].mean()) - exact) > abs(float(estimate.mean()) - exact)  # it converges


def test_importance_weights_make_mixture_samples_unbiased_for_the_student_expectation():
    student_logits, teacher_logits = _toy(seed=1)
    log_q, log_p = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
    alpha = 0.2
    mixture = alpha * log_p.exp() + (1 - alpha) * log_q.exp()
    rewards = log_p - log_q
    weights = log_importance_weights(rewards, alpha).exp()
    assert torch.allclose(weights, log_q.exp() / mixture)
    assert float(weights.max()) <= 1 / (1 - alpha)
    assert torch.equal(log_importance_weights(rewards, 0.0), torch.zeros_like(rewards))

    torch.manual_seed(0)
    samples = sample_from_mixture(student_logits.expand(200_000, -1), teacher_logits.expand(200_000, -1), alpha)
    frequencies = torch.bincount(samples, minlength=6).double() / len(samples)
    assert torch.allclose(frequencies, mixture, atol=0.005)  # samples do come from the mixture
    exact = float(divergence(student_logits, teacher_logits, "reverse_kl"))
    unweighted = float(-rewards[samples].mean())
    weighted = weights[samples] * -rewards[samples]
    error = float(weighted.std()) / len(samples) ** 0.5
    assert abs(float(weighted.mean()) - exact) < 4 * error
    assert abs(unweighted - exact) > 10 * error  # without the weights the mixture's samples are biased


def test_normalized_returns_average_the_rest_of_each_response_and_ignore_padding():
    rewards = torch.tensor([[9.0, 1.0, 2.0, 3.0, 7.0, 7.0], [9.0, 9.0, -1.0, 5.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]], dtype=torch.bool)  # prompt, response, padding
    returns = normalized_returns(rewards, mask)
    assert torch.allclose(returns, torch.tensor([[0, 2.0, 2.5, 3.0, 0, 0], [0, 0, 2.0, 5.0, 0, 0]]))
    advantages = future_advantages(rewards, mask)  # R^Norm_{t+1}: 0 at the last response token
    assert torch.allclose(advantages, torch.tensor([[0, 2.5, 3.0, 0, 0, 0], [0, 0, 5.0, 0, 0, 0]]))
    junk = torch.where(mask, rewards, torch.full_like(rewards, 1e6))
    assert torch.equal(normalized_returns(junk, mask), returns)
    assert torch.equal(future_advantages(junk, mask), advantages)


def test_ppo_surrogate_gives_the_weighted_policy_gradient_at_ratio_one_and_clips_beyond():
    old = torch.tensor([-1.0, -2.0, -0.5, -0.5])
    advantages = torch.tensor([0.5, -2.0, 1.0, -1.0])
    log_weights = torch.tensor([0.1, -0.2, 0.0, 0.0])
    log_q = old.clone().requires_grad_(True)
    ppo_token_losses(log_q, old, advantages, log_weights, clip=0.2).sum().backward()
    assert torch.allclose(log_q.grad, -log_weights.exp() * advantages)  # grad log q times -w A
    # ratio 1.5: the advantage > 0 side is clipped (no gradient), the advantage < 0 side keeps the full ratio
    log_q = (old + torch.log(torch.tensor(1.5))).requires_grad_(True)
    ppo_token_losses(log_q[2:], old[2:], advantages[2:], log_weights[2:], clip=0.2).sum().backward()
    assert torch.allclose(log_q.grad[2:], torch.tensor([0.0, 1.5]))


def test_reverse_kl_by_policy_gradient_is_mode_seeking_where_forward_kl_covers_both_modes():
    """A unimodal student (a discretized Gaussian over 41 tokens, starting narrow between the modes) against a
    bimodal teacher: policy gradient on the reverse KL (sampled rewards, the PPO surrogate at ratio 1, a mean
    baseline) settles on one mode; forward KL (exact gradient) spreads over both."""
    grid = torch.arange(41, dtype=torch.float64)
    teacher = torch.logsumexp(torch.stack([-(grid - 14) ** 2 / 2, -(grid - 26) ** 2 / 2]), 0)

    def student_logits(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
        return -(grid - mu) ** 2 / (2 * torch.exp(2 * log_sigma))

    def train(reverse: bool) -> torch.Tensor:
        torch.manual_seed(0)
        mu = torch.tensor(21.0, dtype=torch.float64, requires_grad=True)
        log_sigma = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.Adam([mu, log_sigma], lr=0.1)
        everywhere = torch.ones(1024, 1, dtype=torch.bool)
        for _ in range(200):
            logits = student_logits(mu, log_sigma)
            if reverse:
                samples = sample_from_mixture(logits.detach().expand(1024, -1), teacher.expand(1024, -1), 0.0)
                log_q = logits.log_softmax(-1)[samples]
                rewards = (teacher.log_softmax(-1)[samples] - log_q).detach()
                returns = normalized_returns(rewards[:, None], everywhere)[:, 0]  # one-token responses: R = r
                loss = ppo_token_losses(log_q, log_q.detach(), returns - returns.mean(),
                                        torch.zeros_like(returns), 0.2).mean()
            else:
                loss = divergence(logits, teacher, "forward_kl")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        return student_logits(mu, log_sigma).detach().softmax(-1)

    def masses(probs: torch.Tensor) -> list[float]:
        return sorted(float(probs[mode - 2 : mode + 3].sum()) for mode in (14, 26))

    reverse, forward = masses(train(reverse=True)), masses(train(reverse=False))
    assert reverse[1] > 0.9 and reverse[0] < 0.01  # one mode
    assert forward[0] > 0.15  # both


# --- rollouts and masking on tiny models ------------------------------------------------------------------------------


def test_decoding_with_kv_caches_and_left_padding_matches_the_full_forward(pair):
    model = load_model(pair[1]).eval()
    prompts, continuation = [[5, 6, 7, 8, 9], [10, 11]], [[20, 21, 22], [30, 31, 32]]
    width = 5
    input_ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    logits, cache = decode_step(model, input_ids, attention, positions, None)
    stepped = [logits]
    for step in range(2):
        token = torch.tensor([[c[step]] for c in continuation])
        attention = torch.cat([attention, torch.ones(2, 1, dtype=torch.long)], 1)
        positions = positions[:, -1:] + 1
        logits, cache = decode_step(model, token, attention, positions, cache)
        stepped.append(logits)
    for row, (prompt, tail) in enumerate(zip(prompts, continuation, strict=True)):
        with torch.no_grad():
            full = model(torch.tensor([prompt + tail[:2]])).logits[0, len(prompt) - 1 :]
        assert torch.allclose(torch.stack([s[row] for s in stepped]), full, atol=1e-4)


def test_rollouts_end_at_the_first_eos_and_padding_after_it_changes_nothing(pair, data):
    student, teacher = load_model(pair[1]).eval(), load_model(pair[0]).eval()
    prompts = [example.input_ids[: example.prompt_length] for example in data.train[:6]]
    torch.manual_seed(0)
    free = mixture_rollouts(student, teacher, prompts, 0.2, 20, None, pad_id=0)
    eos = max(range(512), key=lambda token: sum(response.count(token) for response in free))  # a frequent token
    torch.manual_seed(0)
    ended = mixture_rollouts(student, teacher, prompts, 0.2, 20, eos, pad_id=0)
    for whole, cut in zip(free, ended, strict=True):
        expected = whole[: whole.index(eos) + 1] if eos in whole else whole
        assert cut == expected
    assert any(len(cut) < 20 for cut in ended)

    # the same rollouts with junk after EOS (unattended, unscored): identical scores, losses and gradients
    examples = [example for example in data.train[:4]]
    batch = collate(examples, pad_id=0)
    padded = Batch(torch.cat([batch.input_ids, torch.full((4, 5), 77)], 1),
                   torch.cat([batch.attention_mask, torch.zeros(4, 5, dtype=torch.long)], 1),
                   torch.cat([batch.labels, torch.full((4, 5), IGNORE)], 1), batch.reference)
    student.train()
    results = []
    for b in (batch, padded):
        scored = score_rollouts(student, teacher, b, alpha=0.2)
        student.zero_grad()
        surrogate, kl, _ = policy_loss_sums(student, teacher.get_output_embeddings(), scored, clip=0.2)
        (surrogate + kl).backward()
        results.append((scored.rewards, scored.advantages, surrogate.detach(), kl.detach(),
                        [p.grad.clone() for p in student.parameters()]))
    for a, b in zip(results[0][:4], results[1][:4], strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(results[0][4], results[1][4], strict=True))


def test_a_teacher_equal_to_the_student_gives_ratio_one_and_no_gradient(pair, data):
    student, teacher = load_model(pair[1]).train(), load_model(pair[1]).eval().requires_grad_(False)
    config = _config(teacher_mix=0.2)
    policy = PolicyDistillation(student, StudentLoss(student, config.loss_config), teacher, load_tokenizer(pair[1]),
                                config, torch.device("cpu"), bf16=False)
    torch.manual_seed(0)
    row = policy.update(0, data.train[:4], random.Random(0))
    assert row["response_tokens"] > 4
    rewards = torch.cat([r.rewards for r in policy.rollouts])
    assert torch.allclose(rewards, torch.zeros_like(rewards), atol=1e-6)
    assert row["ratio"] == pytest.approx(1.0, abs=1e-6) and row["clip_fraction"] == 0
    assert abs(row["divergence"]) < 1e-6 and abs(row["loss"]) < 1e-6
    grad_norm = torch.sqrt(sum((p.grad ** 2).sum() for p in student.parameters() if p.grad is not None))
    assert float(grad_norm) < 1e-5


# --- the mode inside distill ------------------------------------------------------------------------------------------


def test_minillm_distillation_lowers_the_reverse_kl_and_records_its_settings(pair, data, tmp_path):
    config = _config(steps=16, batch_size=8, ppo_epochs=2, learning_rate=1e-2)
    result = distill(pair[0], pair[1], data, tmp_path / "out", config)
    with open(result.path / "loss_curve.csv") as handle:
        divergences = [float(row["divergence"]) for row in csv.DictReader(handle) if row["divergence"]]
    assert len(divergences) == 16
    assert sum(divergences[-4:]) < 0.85 * sum(divergences[:4])
    metrics = json.loads((result.path / "metrics.json").read_text())
    assert 0 < metrics["generation_share"] < 1
    assert "ppo_epochs 2 (paper: 4)" in metrics["departures_from_paper"]
    assert "no language-modeling term (MiniLLM: a pre-training corpus, lm_data)" in metrics["departures_from_paper"]
    lineage = json.loads((result.path / "cbd.json").read_text())["distillation"]
    assert lineage["config"]["mode"] == "minillm" and lineage["metrics"]["departures_from_paper"]


def test_killed_minillm_run_resumes_to_the_same_weights(pair, data, tmp_path):
    """With the language-modeling term on a text file, whose blocks are drawn at random every step."""
    text = tmp_path / "text.txt"
    text.write_text(SHAKESPEARE.read_text()[:20_000])  # the head of the file: enough blocks, quick to tokenize
    config = _config(steps=6, checkpoint_every=2, eval_every=3, micro_batch_size=2, max_new_tokens=6,
                     lm_data=str(text), lm_weight=0.5)
    whole = assert_resumes_to_the_same_weights(
        lambda out, **kwargs: distill(pair[0], pair[1], data, out, config, **kwargs), tmp_path)
    with open(whole.path / "loss_curve.csv") as handle:
        assert all(float(row["cross_entropy"]) > 0 for row in csv.DictReader(handle) if row["step"] != "0")


def test_minillm_settings_are_checked():
    with pytest.raises(ValueError, match="reverse_kl"):
        DistillConfig(mode="minillm", loss="jsd")
    with pytest.raises(ValueError, match="multiple of ppo_epochs"):
        DistillConfig(mode="minillm", ppo_epochs=4, checkpoint_every=6)
    with pytest.raises(ValueError, match="teacher_mix"):
        DistillConfig(mode="minillm", teacher_mix=1.0)
