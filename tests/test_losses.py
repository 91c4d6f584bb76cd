"""Divergences: values, direction, gradients, masking, normalization, chunking, precision, padded vocabularies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbd_engine.nn.losses import (
    DIVERGENCE_FUNCTIONS,
    DIVERGENCES,
    LossConfig,
    chunked_token_losses,
    divergence,
    eager_token_losses,
)

KINDS = [(kind, {}) for kind in DIVERGENCES] + [("jsd", {"beta": 0.1}), ("jsd", {"beta": 0.9})]



def test_every_offered_loss_has_exactly_one_divergence_function():
    """The API and the CLI offer DIVERGENCES; the engine computes what DIVERGENCE_FUNCTIONS registers."""
    assert tuple(DIVERGENCE_FUNCTIONS) == DIVERGENCES

@pytest.mark.parametrize("kind,extra", KINDS)
def test_divergence_of_a_distribution_with_itself_is_exactly_zero(kind, extra):
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 300) * 4
    value = divergence(logits, logits.clone(), kind, **extra)
    assert torch.equal(value, torch.zeros_like(value))


@pytest.mark.parametrize("kind,extra", KINDS)
def test_divergence_is_positive_and_finite_for_far_apart_distributions(kind, extra):
    torch.manual_seed(1)
    student, teacher = torch.randn(64, 50) * 30, torch.randn(64, 50) * 30  # log-ratio far past exp's fp32 range
    value = divergence(student, teacher, kind, **extra)
    assert torch.isfinite(value).all() and (value > 0).all()


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a.log() - b.log())).sum(-1)


def test_direction_on_an_asymmetric_pair_in_float64():
    # teacher p is bimodal, student q sits on one mode: KL(p||q) and KL(q||p) differ a lot
    p = torch.tensor([[0.49, 0.49, 0.02]], dtype=torch.float64)
    q = torch.tensor([[0.96, 0.02, 0.02]], dtype=torch.float64)
    s, t = q.log(), p.log()
    forward, reverse = _kl(p, q), _kl(q, p)
    assert not torch.allclose(forward, reverse)
    assert torch.allclose(divergence(s, t, "forward_kl"), forward, atol=1e-12)
    assert torch.allclose(divergence(s, t, "reverse_kl"), reverse, atol=1e-12)
    beta = 0.3
    m = beta * p + (1 - beta) * q
    assert torch.allclose(divergence(s, t, "jsd", beta=beta), beta * _kl(p, m) + (1 - beta) * _kl(q, m), atol=1e-12)
    a = 0.1
    assert torch.allclose(divergence(s, t, "skew_forward_kl", skew=a), _kl(p, a * p + (1 - a) * q), atol=1e-12)
    assert torch.allclose(divergence(s, t, "skew_reverse_kl", skew=a), _kl(q, a * q + (1 - a) * p), atol=1e-12)


def test_temperature_applies_to_both_models():
    torch.manual_seed(2)
    s, t = torch.randn(4, 20, dtype=torch.float64), torch.randn(4, 20, dtype=torch.float64)
    assert torch.allclose(divergence(s, t, "reverse_kl", temperature=2.0), divergence(s / 2, t / 2, "reverse_kl"))


@pytest.mark.parametrize("kind,extra", KINDS)
def test_gradcheck(kind, extra):
    torch.manual_seed(3)
    s = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 6, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: divergence(x, t, kind, **extra), (s,))


def test_padded_teacher_vocabulary_is_cut_to_the_student():
    torch.manual_seed(4)
    s, t = torch.randn(6, 100), torch.randn(6, 100)
    padded = torch.cat([t, torch.full((6, 28), 5.0)], dim=-1)  # junk rows past the tokenizer (Qwen 151936 vs 152064)
    assert torch.allclose(divergence(s, padded), divergence(s, t))


def _heads(hidden: int = 16, vocab: int = 40, seed: int = 5):
    torch.manual_seed(seed)
    return torch.nn.Linear(hidden, vocab, bias=False), torch.nn.Linear(hidden, vocab, bias=False)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_chunked_equals_eager_in_value_and_gradient(kind):
    s_head, t_head = _heads()
    h = torch.randn(37, 16, requires_grad=True)
    th = torch.randn(37, 16)
    targets = torch.randint(0, 40, (37,))
    config = LossConfig(kind=kind, chunk_size=8)
    div, ce = chunked_token_losses(h, s_head, targets, th, t_head, config)
    (div + ce).backward()
    assert t_head.weight.grad is None  # the teacher never receives gradients
    grads = h.grad.clone(), s_head.weight.grad.clone()
    h.grad, s_head.weight.grad = None, None
    e_div, e_ce = eager_token_losses(s_head(h), targets, t_head(th).detach(), config)
    (e_div + e_ce).backward()
    assert torch.allclose(div, e_div, atol=1e-5) and torch.allclose(ce, e_ce, atol=1e-5)
    assert torch.allclose(grads[0], h.grad, atol=1e-6) and torch.allclose(grads[1], s_head.weight.grad, atol=1e-6)


def test_weighted_sums_through_a_biased_tied_head_match_eager_gradients():
    """Different weights on the two sums reach the hidden states, the output layer's weight (tied to an embedding that
    also gets gradient) and its bias exactly as through full logits."""
    torch.manual_seed(6)
    embedding = torch.nn.Embedding(40, 16)
    s_head, t_head = torch.nn.Linear(16, 40), torch.nn.Linear(16, 40)
    s_head.weight = embedding.weight
    ids, targets = torch.randint(0, 40, (29,)), torch.randint(0, 40, (29,))
    th = torch.randn(29, 16)

    def gradients(losses) -> list[torch.Tensor]:
        embedding.zero_grad(), s_head.zero_grad()
        div, ce = losses(torch.tanh(embedding(ids)))
        (2.5 * div + 0.3 * ce + embedding(ids).sum()).backward()
        return [embedding.weight.grad.clone(), s_head.bias.grad.clone()]

    config = LossConfig(chunk_size=6)
    chunked = gradients(lambda h: chunked_token_losses(h, s_head, targets, th, t_head, config))
    eager = gradients(lambda h: eager_token_losses(s_head(h), targets, t_head(th).detach(), config))
    for got, want in zip(chunked, eager, strict=True):
        assert torch.allclose(got, want, atol=1e-5)


def test_chunked_losses_pass_gradcheck_through_hidden_states_in_float64():
    torch.manual_seed(7)
    s_head, t_head = torch.nn.Linear(6, 11).double(), torch.nn.Linear(6, 11).double()
    th, targets = torch.randn(7, 6, dtype=torch.float64), torch.randint(0, 11, (7,))
    h = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)

    def weighted(hidden: torch.Tensor) -> torch.Tensor:
        div, ce = chunked_token_losses(hidden, s_head, targets, th, t_head, LossConfig(kind="jsd", chunk_size=3))
        return div + 0.5 * ce

    assert torch.autograd.gradcheck(weighted, (h,))


def test_each_output_layer_runs_once_per_chunk_forward_and_backward():
    """The logits of both models are computed once: backward scales the gradients taken in forward instead of
    recomputing the chunk (activation checkpointing would run both heads twice)."""
    s_head, t_head = _heads()
    calls = {"student": 0, "teacher": 0}
    s_head.register_forward_hook(lambda *_: calls.__setitem__("student", calls["student"] + 1))
    t_head.register_forward_hook(lambda *_: calls.__setitem__("teacher", calls["teacher"] + 1))
    h = torch.randn(37, 16, requires_grad=True)
    div, _ = chunked_token_losses(h, s_head, torch.randint(0, 40, (37,)), torch.randn(37, 16), t_head,
                                  LossConfig(chunk_size=8), need_ce=False)
    div.backward()
    assert calls == {"student": 5, "teacher": 5} and h.grad.abs().sum() > 0


def test_no_gradients_are_taken_without_grad_mode():
    s_head, t_head = _heads()
    h = torch.randn(37, 16, requires_grad=True)
    with torch.no_grad():
        div, ce = chunked_token_losses(h, s_head, torch.randint(0, 40, (37,)), torch.randn(37, 16), t_head,
                                       LossConfig(chunk_size=8))
    assert not div.requires_grad and not ce.requires_grad and div > 0 and ce > 0
    assert s_head.weight.grad is None and h.grad is None


def test_nothing_scored_gives_zero_with_finite_gradients():
    s_head, t_head = _heads()
    h = torch.randn(0, 16, requires_grad=True)
    div, ce = chunked_token_losses(h, s_head, torch.zeros(0, dtype=torch.long), torch.randn(0, 16), t_head)
    (div + ce).backward()
    assert div.item() == 0 and ce.item() == 0
    assert s_head.weight.grad is None or torch.isfinite(s_head.weight.grad).all()


def test_bf16_is_close_to_fp32_in_value_and_gradient():
    s_head, t_head = _heads(hidden=32, vocab=512)
    th, targets = torch.randn(64, 32), torch.randint(0, 512, (64,))

    def value_and_gradients(bf16: bool) -> tuple[float, torch.Tensor, torch.Tensor]:
        h = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).requires_grad_()
        s_head.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            div, _ = chunked_token_losses(h, s_head, targets, th, t_head, LossConfig(chunk_size=16))
        div.backward()
        return div.item(), h.grad.flatten(), s_head.weight.grad.flatten()

    fp32, bf16 = value_and_gradients(False), value_and_gradients(True)
    assert abs(bf16[0] - fp32[0]) / fp32[0] < 0.02
    for low, high in zip(bf16[1:], fp32[1:], strict=True):
        assert low.dtype == torch.float32 and F.cosine_similarity(low, high, dim=0) > 0.99


def test_default_chunk_is_larger_on_accelerators():
    """CPU chunks bound the loss's memory; accelerator chunks are ~12x larger because each one costs a launch and a
    recomputation (measured on an H200, docs/DISTILLATION.md)."""
    from cbd_engine.nn.losses import default_chunk

    cpu, gpu = default_chunk(torch.device("cpu"), 49152), default_chunk(torch.device("cuda"), 49152)
    assert cpu * 49152 <= 2**23 < (cpu + 1) * 49152
    assert gpu > 10 * cpu and default_chunk(torch.device("cpu"), 10**9) == 1
