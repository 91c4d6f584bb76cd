"""The teacher-output cache: the sparse (top-k + tail) divergence under both tail models, the cache files and keys,
distillation from it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from distill_helpers import VOCAB, assert_resumes_to_the_same_weights, dolly_examples, tiny_with_tokenizer

from cbd_engine.data.batches import Example, collate, response_positions
from cbd_engine.distillation import teacher_cache
from cbd_engine.distillation.recipe import distill
from cbd_engine.distillation.step import StudentLoss, batch_loss_sums
from cbd_engine.distillation.teacher_cache import (
    CacheSettings,
    TeacherCache,
    build_teacher_cache,
    cache_key,
    teacher_top_k,
)
from cbd_engine.nn.loading import load_model
from cbd_engine.nn.losses import (
    DIVERGENCES,
    TeacherTopK,
    bucket_log_probs,
    chunked_token_losses,
    divergence,
    sparse_divergence,
)
from cbd_engine.spec.chain import parse_spec
from cbd_engine.spec.distill_config import MODES, TEACHER_CACHE_TAILS, DistillConfig

MAX_LENGTH = 64


def _top_k(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0) -> TeacherTopK:
    ids = teacher_logits.topk(k, dim=-1).indices
    return TeacherTopK(ids, *bucket_log_probs(teacher_logits, ids, temperature))


def _zipf_pair(vocab: int = 2000, positions: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher logits with a language model's heavy-tailed (Zipf) ranks, and a student that is a noisy copy."""
    generator = torch.Generator().manual_seed(0)
    ranks = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(positions)]) + 1
    noise = torch.randn(2, positions, vocab, generator=generator, dtype=torch.float64)
    teacher = -1.5 * ranks.double().log() + 0.3 * noise[0]
    student = teacher + 0.8 * noise[1]
    return student, teacher


# --- the sparse divergence ------------------------------------------------------------------------------------------


def _teacher_with_tail(tail_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Teacher logits [N, V] whose k tokens at random places lie above every other; the others are `tail_logits`
    [N, V] shifted, so the teacher's tail has their shape."""
    generator = torch.Generator().manual_seed(7)
    top = tail_logits.max(-1, keepdim=True).values + 3 + torch.rand(tail_logits.shape[0], k, generator=generator,
                                                                     dtype=tail_logits.dtype) * 4
    places = torch.stack([torch.randperm(tail_logits.shape[-1], generator=generator)[:k] for _ in tail_logits])
    return (tail_logits - 1.0).scatter(-1, places, top)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_divergence_of_the_teacher_with_itself_is_exactly_zero(kind):
    torch.manual_seed(0)
    logits = torch.randn(12, 300) * 4
    top = _top_k(logits, 8)
    # bucket: any teacher; uniform: the teacher the cache stands for, its tail spread evenly
    for tail, student in (("bucket", logits.clone()), ("uniform", top.uniform_tail_logits(300))):
        value = sparse_divergence(student, top, kind, tail=tail)
        assert torch.equal(value, torch.zeros_like(value))


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_each_tail_model_is_exact_for_the_teacher_tail_it_assumes(kind):
    torch.manual_seed(2)
    student = torch.randn(9, 60, dtype=torch.float64) * 3
    k = 6
    uniform_teacher = _teacher_with_tail(torch.zeros_like(student), k)
    shaped_teacher = _teacher_with_tail(student, k)  # its tail proportional to the student's
    for tail, teacher, other in (("uniform", uniform_teacher, shaped_teacher),
                                 ("bucket", shaped_teacher, uniform_teacher)):
        exact = sparse_divergence(student, _top_k(teacher, k), kind, tail=tail)
        assert torch.allclose(exact, divergence(student, teacher, kind), atol=1e-12)
        off = sparse_divergence(student, _top_k(other, k), kind, tail=tail)
        assert not torch.allclose(off, divergence(student, other, kind), atol=1e-3)
    student_like = uniform_teacher + 0.5  # the uniform-tailed teacher itself, as other logits: zero up to rounding
    value = sparse_divergence(student_like, _top_k(uniform_teacher, k), kind, tail="uniform")
    assert torch.allclose(value, torch.zeros_like(value), atol=1e-12)


@pytest.mark.parametrize("tail", TEACHER_CACHE_TAILS)
@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_top_k_covering_the_vocabulary_gives_the_full_divergence(tail, kind, temperature):
    torch.manual_seed(1)
    student, teacher = torch.randn(9, 50, dtype=torch.float64) * 3, torch.randn(9, 50, dtype=torch.float64) * 3
    sparse = sparse_divergence(student, _top_k(teacher, 50, temperature), kind, temperature=temperature, tail=tail)
    assert torch.allclose(sparse, divergence(student, teacher, kind, temperature=temperature), atol=1e-12)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
def test_error_against_the_full_divergence_shrinks_as_k_grows(kind):
    student, teacher = _zipf_pair()
    full = divergence(student, teacher, kind)
    ks = (1, 4, 16, 64, 256, 1024, 2000)
    bucket = [float((full - sparse_divergence(student, _top_k(teacher, k), kind)).sum()) for k in ks]
    assert all(error >= -1e-9 for error in bucket)  # merging tokens never increases a divergence
    assert all(later <= earlier + 1e-9 for earlier, later in zip(bucket, bucket[1:], strict=False))
    assert bucket[4] < 0.1 * bucket[0] and abs(bucket[-1]) < 1e-9
    # a uniform tail is no bound (here, a Zipf tail, it overshoots), but its error shrinks as well
    uniform = [abs(float((full - sparse_divergence(student, _top_k(teacher, k), kind, tail="uniform")).sum()))
               for k in ks]
    assert all(later <= earlier + 1e-9 for earlier, later in zip(uniform, uniform[1:], strict=False))
    assert uniform[4] < 0.1 * uniform[0] and uniform[-1] < 1e-9


def test_the_tail_stays_exact_when_the_top_k_hold_nearly_all_the_mass():
    logits = torch.zeros(1, 1000)
    logits[0, 0] = 30.0  # the tail holds 999 e^-30 ~ 1e-10 of the mass: 1 - sum(top-k) is lost in float32
    _, tail = bucket_log_probs(logits, torch.tensor([[0]]))
    _, exact = bucket_log_probs(logits.double(), torch.tensor([[0]]))
    assert torch.isfinite(tail).all() and torch.allclose(tail.double(), exact, atol=1e-4)


@pytest.mark.parametrize("tail", TEACHER_CACHE_TAILS)
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_sparse_gradcheck(kind, tail):
    torch.manual_seed(3)
    s = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    top = _top_k(torch.randn(3, 12, dtype=torch.float64), 4)
    assert torch.autograd.gradcheck(lambda x: sparse_divergence(x, top, kind, temperature=1.5, tail=tail), (s,))


@pytest.mark.parametrize("tail", TEACHER_CACHE_TAILS)
def test_chunked_sparse_loss_equals_the_eager_one_in_value_and_gradient(tail):
    torch.manual_seed(5)
    head = torch.nn.Linear(16, 40, bias=False)
    h = torch.randn(37, 16, requires_grad=True)
    top = _top_k(torch.randn(37, 40) * 2, 6)
    targets = torch.randint(0, 40, (37,))
    config = DistillConfig(loss="forward_kl", chunk_size=8, teacher_cache_tail=tail).loss_config
    div, ce = chunked_token_losses(h, head, targets, top, None, config)
    (div + ce).backward()
    grad = h.grad.clone()
    h.grad = None
    eager = sparse_divergence(head(h), top, "forward_kl", tail=tail).sum() + torch.nn.functional.cross_entropy(
        head(h), targets, reduction="sum")
    eager.backward()
    assert torch.allclose(div + ce, eager, atol=1e-4) and torch.allclose(grad, h.grad, atol=1e-6)


# --- the cache ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return tiny_with_tokenizer(root / "teacher", seed=1, num_hidden_layers=3), \
        tiny_with_tokenizer(root / "student", seed=2, num_hidden_layers=2)


@pytest.fixture(scope="module")
def data(pair):
    return dolly_examples(pair[1], train_rows=40, max_length=MAX_LENGTH)


def _indexed(examples, indices):
    return [replace(examples[i], index=i) for i in indices]


def test_cache_rows_are_the_teachers_top_k_and_a_second_build_does_nothing(pair, data, tmp_path, monkeypatch):
    train = data.train
    settings = CacheSettings(top_k=16, dtype="float32")
    folder = build_teacher_cache(pair[0], train, settings, tmp_path, batch_size=3)
    info = json.loads((folder / "cache.json").read_text())
    assert info["examples"] == len(train) and info["positions"] == sum(e.num_response_tokens for e in train)
    assert info["teacher_forwards"] == -(-len(train) // 3)

    teacher = load_model(pair[0]).eval()
    batch = collate(_indexed(train, [7, 0, 31]), pad_id=0)
    fresh = teacher_top_k(teacher, batch.input_ids, batch.attention_mask, response_positions(batch.labels), 16)
    cached = TeacherCache(folder).for_batch(batch)
    assert torch.equal(cached.ids, fresh.ids)
    assert torch.allclose(cached.log_probs, fresh.log_probs, atol=1e-5)
    assert torch.allclose(cached.tail, fresh.tail, atol=1e-5)

    monkeypatch.setattr(teacher_cache, "load_model", lambda *a, **k: pytest.fail("the teacher was loaded again"))
    assert build_teacher_cache(pair[0], train, settings, tmp_path) == folder


def test_float16_storage_and_shards_give_the_same_rows(pair, data, tmp_path):
    train = data.train
    whole = TeacherCache(build_teacher_cache(pair[0], train, CacheSettings(8, dtype="float32"), tmp_path / "a"))
    sharded = TeacherCache(build_teacher_cache(pair[0], train, CacheSettings(8, dtype="float16"), tmp_path / "b",
                                               shard_bytes=2000))
    assert len(sharded.info["shards"]) > 3
    indices = list(range(len(train)))[::-1]
    a, b = whole.lookup(indices), sharded.lookup(indices)
    assert torch.equal(a.ids, b.ids)
    assert torch.allclose(a.log_probs, b.log_probs, atol=1e-2) and torch.allclose(a.tail, b.tail, atol=1e-2)
    with pytest.raises(IndexError):
        whole.rows(len(train))


def test_key_changes_with_k_temperature_precision_teacher_and_data(pair, data):
    train = data.train
    base = CacheSettings(16)
    keys = {
        cache_key(pair[0], train, base),
        cache_key(pair[0], train, CacheSettings(32)),
        cache_key(pair[0], train, CacheSettings(16, temperature=2.0)),
        cache_key(pair[0], train, CacheSettings(16, bf16=True)),
        cache_key(pair[0], train, CacheSettings(16, dtype="float32")),
        cache_key(pair[1], train, base),  # other weights (the student as a teacher)
        cache_key(pair[0], train[1:], base),
        cache_key(pair[0], [Example(train[0].input_ids[:-1], train[0].labels[:-1], train[0].prompt_length)]
                  + train[1:], base),
    }
    assert len(keys) == 8
    assert cache_key(pair[0], list(train), CacheSettings(16)) in keys  # the same inputs: the same key


def test_cached_loss_with_k_covering_the_vocabulary_equals_the_teacher_forward(pair, data, tmp_path):
    train = data.train
    cache = TeacherCache(build_teacher_cache(pair[0], train, CacheSettings(VOCAB, dtype="float32"), tmp_path))
    teacher = load_model(pair[0]).eval().requires_grad_(False)
    student = load_model(pair[1]).train()
    loss = StudentLoss(student, DistillConfig(loss="forward_kl").loss_config)
    batch = collate(_indexed(train, [3, 9, 4, 20]), pad_id=0)
    results = []
    for source in (teacher, cache):
        student.zero_grad()
        div, _, _ = batch_loss_sums(loss, source, batch, ce_only=False, need_ce=False)
        div.backward()
        results.append((div.detach(), [p.grad.clone() for p in student.parameters()]))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-4)
    assert all(torch.allclose(a, b, atol=1e-5, rtol=1e-3) for a, b in zip(results[0][1], results[1][1], strict=True))


# --- distillation from the cache ------------------------------------------------------------------------------------


def _config(tmp_path, **overrides) -> DistillConfig:
    settings = dict(steps=12, batch_size=4, learning_rate=3e-3, max_length=MAX_LENGTH, device="cpu",
                    teacher_cache=16, teacher_cache_dir=str(tmp_path / "cache"))
    return DistillConfig(**{**settings, **overrides})


def test_distillation_from_the_cache_learns_and_loads_the_teacher_once(pair, data, tmp_path, monkeypatch):
    import cbd_engine.distillation.recipe

    loaded = []

    def counting(load):
        def counted(path, *args, **kwargs):
            loaded.append(str(path))
            return load(path, *args, **kwargs)
        return counted

    for module in (cbd_engine.distillation.recipe, teacher_cache):
        monkeypatch.setattr(module, "load_model", counting(module.load_model))
    config = _config(tmp_path, eval_every=6)
    first = distill(pair[0], pair[1], data, tmp_path / "first", config)
    assert loaded.count(str(pair[0])) == 1  # to build the cache
    curve = (first.path / "loss_curve.csv").read_text().splitlines()
    header = curve[0].split(",")
    losses = [float(line.split(",")[header.index("loss")]) for line in curve[2:]]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert first.metrics["validation_loss"] < first.metrics["validation_loss_before"]

    loaded.clear()
    distill(pair[0], pair[1], data, tmp_path / "second", _config(tmp_path, steps=2, loss="forward_kl"))
    assert loaded == [str(pair[1])]  # the student only: the teacher's outputs come from the cache


def test_killed_run_with_the_cache_resumes_to_the_same_weights(pair, data, tmp_path):
    config = _config(tmp_path, steps=5, micro_batch_size=2, checkpoint_every=2, ce_weight=0.2)
    assert_resumes_to_the_same_weights(
        lambda out, **kwargs: distill(pair[0], pair[1], data, out, config, **kwargs), tmp_path)


def test_the_cache_is_refused_on_policy_and_passes_through_a_chain_spec():
    for mode in set(MODES) - {"off_policy"}:
        with pytest.raises(ValueError, match="off_policy"):
            DistillConfig(mode=mode, teacher_cache=64)
    for bad in (True, 0, "64"):
        with pytest.raises(ValueError, match="teacher_cache"):
            DistillConfig(teacher_cache=bad)
    with pytest.raises(ValueError, match="teacher_cache_tail"):
        DistillConfig(teacher_cache=64, teacher_cache_tail="zipf")
    with pytest.raises(ValueError, match="tail"):
        sparse_divergence(torch.zeros(1, 4), _top_k(torch.zeros(1, 4), 2), tail="zipf")
    spec = {"source": "/x", "anchors": [{"size": "100M"}], "dataset": {"path": "d.jsonl"},
            "distillation": {"teacher_cache": 64, "teacher_cache_tail": "uniform"}}
    config = DistillConfig.from_dict(parse_spec(spec).distillation)
    assert config.teacher_cache == 64 and config.loss_config.teacher_cache_tail == "uniform"
    with pytest.raises(ValueError, match="off_policy"):
        parse_spec({**spec, "distillation": {"teacher_cache": 64, "mode": "on_policy"}})
