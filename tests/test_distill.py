"""The distillation loop on tiny models: masks, normalization over micro-batches, training, resume, curves."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOLLY
from distill_helpers import assert_resumes_to_the_same_weights, dolly_examples, tiny_with_tokenizer

from cbd_engine.data.batches import IGNORE, Batch, collate
from cbd_engine.data.rows import read_instruction_rows, split_rows
from cbd_engine.distillation.recipe import distill
from cbd_engine.distillation.step import StudentLoss, accumulate_gradients, batch_loss_sums
from cbd_engine.nn.loading import compile_decoders, load_model, load_tokenizer
from cbd_engine.nn.validation import response_loss
from cbd_engine.spec.distill_config import DistillConfig

MAX_LENGTH = 64


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    teacher = tiny_with_tokenizer(root / "teacher", seed=1, num_hidden_layers=3)
    student = tiny_with_tokenizer(root / "student", seed=2, num_hidden_layers=2)
    return teacher, student


@pytest.fixture(scope="module")
def data(pair):
    return dolly_examples(pair[1], max_length=MAX_LENGTH)


def _models(pair):
    teacher = load_model(pair[0]).eval().requires_grad_(False)
    student = load_model(pair[1]).train()
    return teacher, student


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()]


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_changing_padding_changes_nothing(pair, data, kind):
    teacher, student = _models(pair)
    loss = StudentLoss(student, DistillConfig(loss=kind).loss_config)
    batch = collate(data.train[:4], pad_id=0)
    repadded = Batch(batch.input_ids.masked_fill(batch.attention_mask == 0, 123), batch.attention_mask,
                     batch.labels, batch.reference)
    results = []
    for b in (batch, repadded):
        student.zero_grad()
        div, ce, _ = batch_loss_sums(loss, teacher, b, ce_only=False)
        (div + ce).backward()
        results.append((div.detach(), ce.detach(), _grads(student)))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(results[0][2], results[1][2], strict=True))


def test_all_masked_batch_gives_zero_with_finite_gradients(pair, data):
    teacher, student = _models(pair)
    batch = collate(data.train[:2], pad_id=0)
    batch.labels.fill_(IGNORE)
    config = DistillConfig(ce_weight=1.0)
    div, ce, tokens, _, _ = accumulate_gradients(StudentLoss(student, config.loss_config), teacher, [batch],
                                              config, torch.device("cpu"), bf16=False, ce_only=False)
    assert div == 0 and ce == 0 and tokens == 0
    assert all(torch.isfinite(g).all() and not g.any() for g in _grads(student))


def test_cross_entropy_matches_transformers_shifted_loss(pair, data):
    _, student = _models(pair)
    batch = collate(data.train[:3], pad_id=0)
    _, ce, _ = batch_loss_sums(StudentLoss(student, DistillConfig().loss_config), None, batch, ce_only=True)
    with torch.no_grad():
        reference = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert torch.allclose(ce / batch.num_response_tokens, reference, atol=1e-5)


def test_compiled_decoders_keep_state_dict_keys_losses_and_gradients(pair, data):
    """DistillConfig.compile: the traced decoders (dynamo with the eager backend, fast enough for a test; inductor on
    accelerators) give the eager losses and gradients, and the weights keep their names for checkpoints."""
    batch = collate(data.train[:3], pad_id=0)
    results = []
    for compiled in (False, True):
        teacher, student = _models(pair)
        keys = list(student.state_dict())
        if compiled:
            compile_decoders(student, teacher, backend="eager")
            assert all(m.base_model._compiled_call_impl is not None for m in (student, teacher))
        div, ce, _ = batch_loss_sums(StudentLoss(student, DistillConfig().loss_config), teacher, batch, ce_only=False)
        (div + ce).backward()
        assert list(student.state_dict()) == keys
        results.append((div.detach(), ce.detach(), _grads(student)))
    (div, ce, grads), (div_c, ce_c, grads_c) = results
    assert torch.allclose(div, div_c, atol=1e-5) and torch.allclose(ce, ce_c, atol=1e-4)
    assert all(torch.allclose(g, g_c, atol=1e-5) for g, g_c in zip(grads, grads_c, strict=True))


@pytest.mark.parametrize("kind", ["reverse_kl", "forward_kl"])
def test_same_global_batch_gives_same_gradients_for_any_micro_batch_split(pair, data, kind):
    teacher, student = _models(pair)
    config = DistillConfig(loss=kind, ce_weight=0.5)
    examples = data.train[:8]
    grads = []
    for micro in (8, 4, 1):
        student.zero_grad()
        batches = [collate(examples[i : i + micro], pad_id=0) for i in range(0, 8, micro)]
        accumulate_gradients(StudentLoss(student, config.loss_config), teacher, batches, config,
                             torch.device("cpu"), bf16=False, ce_only=False)
        grads.append(_grads(student))
    for other in grads[1:]:
        assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(grads[0], other, strict=True))


def _run(pair, data, out, config, **kwargs):
    return distill(pair[0], pair[1], data, out, config, **kwargs)


def test_off_policy_distillation_lowers_the_divergence_and_writes_a_model_folder(pair, data, tmp_path):
    events = []
    config = DistillConfig(steps=12, batch_size=4, learning_rate=3e-3, max_length=MAX_LENGTH, eval_every=6,
                           device="cpu", ce_weight=0.1)
    result = _run(pair, data, tmp_path / "out", config, progress=events.append)
    out = result.path
    assert {"config.json", "model.safetensors", "tokenizer.json", "cbd.json", "metrics.json", "loss_curve.csv",
            "loss_curve.png"} <= {p.name for p in out.iterdir()}
    curve = (out / "loss_curve.csv").read_text().splitlines()
    assert len(curve) == 1 + 1 + 12  # header, step 0 (validation before), one row per step
    column = curve[0].split(",").index("loss")
    losses = [float(line.split(",")[column]) for line in curve[2:]]
    assert sum(losses[-3:]) < sum(losses[:3])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["validation_loss"] <= metrics["validation_loss_before"]
    assert json.loads((out / "cbd.json").read_text())["distillation"]["config"]["steps"] == 12
    assert [e.step for e in events][-1] == 12 and events[-1].loss is not None and events[-1].stage == "distill"
    # the kept model is the best checkpoint by validation loss, and response_loss measures it again
    model, tokenizer = load_model(out), load_tokenizer(out)
    valid_rows = split_rows(read_instruction_rows(DOLLY)).validation[:6]
    assert abs(response_loss(model, tokenizer, valid_rows, max_length=MAX_LENGTH) - metrics["validation_loss"]) < 1e-4


@pytest.mark.parametrize("mode", ["off_policy", "on_policy"])
def test_killed_run_resumes_to_the_same_weights(pair, data, tmp_path, mode):
    config = DistillConfig(steps=5, batch_size=4, micro_batch_size=2, learning_rate=3e-3, max_length=MAX_LENGTH,
                           checkpoint_every=2, eval_every=3, device="cpu", mode=mode, max_new_tokens=8,
                           ce_weight=0.2)
    assert_resumes_to_the_same_weights(lambda out, **kwargs: _run(pair, data, out, config, **kwargs), tmp_path)


def test_sampled_responses_keep_the_prompt_and_skip_cross_entropy(pair, data):
    import random

    from cbd_engine.distillation.on_policy import sample_responses

    _, student = _models(pair)
    tokenizer = load_tokenizer(pair[1])
    examples = data.train[:4]
    sampled = sample_responses(student, examples, tokenizer, DistillConfig(data_mix=0.0, max_new_tokens=5,
                                                                           max_length=MAX_LENGTH), random.Random(0))
    for before, after in zip(examples, sampled, strict=True):
        assert not after.reference
        assert after.input_ids[: after.prompt_length] == before.input_ids[: before.prompt_length]
        assert 0 < len(after) - after.prompt_length <= 5
    assert collate(sampled, 0).num_reference_tokens == 0
    kept = sample_responses(student, examples, tokenizer, DistillConfig(data_mix=1.0), random.Random(0))
    assert kept == examples


def test_cli_distill_and_folder_validation_loss(pair, tmp_path):
    from cbd_cli import main
    from cbd_engine.nn.validation import validation_loss

    out = tmp_path / "cli"
    code = main(["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(DOLLY), "--out",
                 str(out), "--steps", "2", "--batch-size", "2", "--max-length", "32", "--eval-rows", "4",
                 "--device", "cpu", "--loss", "jsd"])
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 2
    again = validation_loss(out, DOLLY, max_rows=4, max_length=32)
    assert again == pytest.approx(metrics["validation_loss"], abs=1e-4)
    assert main(["distill", "--teacher", str(pair[0]), "--student", str(pair[1]), "--data", str(DOLLY), "--out",
                 str(out), "--steps", "2"]) == 2  # the output exists: refused before any work


def test_rouge_l_can_select_the_kept_checkpoint(pair, data, tmp_path):
    config = DistillConfig(steps=2, batch_size=2, max_length=MAX_LENGTH, device="cpu", eval_every=1,
                           select_by="rouge_l", rouge_rows=3, rouge_max_new_tokens=6)
    result = _run(pair, data, tmp_path / "rouge", config)
    metrics = result.metrics
    assert metrics["selected_by"] == "rouge_l" and 0 <= metrics["rouge_l"] <= 1
    assert metrics["rouge_l"] >= metrics["rouge_l_before"]  # the kept checkpoint is the best by Rouge-L
    rows = [row.split(",") for row in (result.path / "loss_curve.csv").read_text().splitlines()]
    column = rows[0].index("rouge_l")  # measured on the dev rows at every evaluation
    assert rows[0][column - 1] == "dev_loss" and all(row[column] for row in rows[1:])
    with pytest.raises(ValueError, match="select_by"):
        DistillConfig(select_by="bleu")


@pytest.mark.parametrize("family", ["llama_untied_bias", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox"])
def test_hidden_states_and_head_reproduce_each_familys_own_loss(tiny_model, family):
    model = load_model(tiny_model(family)).eval()  # GPT-2 has dropout: compare without it
    torch.manual_seed(0)
    input_ids = torch.randint(0, 97, (2, 12))
    labels = input_ids.clone()
    labels[:, :5] = IGNORE
    batch = Batch(input_ids, torch.ones_like(input_ids), labels, torch.ones(2, dtype=torch.bool))
    _, ce, _ = batch_loss_sums(StudentLoss(model, DistillConfig().loss_config), None, batch, ce_only=True)
    with torch.no_grad():
        reference = model(input_ids=input_ids, labels=labels).loss
    assert torch.allclose(ce / batch.num_response_tokens, reference, atol=1e-5)


def test_cli_switches_set_and_clear_boolean_settings_over_the_config_file(tmp_path):
    import argparse

    from cbd_cli.distill import add_config_options, config_from_args

    parser = argparse.ArgumentParser()
    add_config_options(parser)
    config_file = tmp_path / "config.yaml"
    config_file.write_text("fsdp: true\nbf16: true\nsteps: 7\n")
    given = config_from_args(parser.parse_args(["--config", str(config_file), "--no-bf16", "--compile"]))
    assert (given.fsdp, given.bf16, given.compile, given.steps) == (True, False, True, 7)
    unset = config_from_args(parser.parse_args([]))
    assert (unset.fsdp, unset.bf16, unset.gradient_checkpointing, unset.compile) == (False, None, None, False)
