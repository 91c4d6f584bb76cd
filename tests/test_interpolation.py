"""Line training (issue 20): the mixed model of a teacher anchor and its pruned student, its gradients, and a chain
built with it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DOLLY
from distill_helpers import PAIR_STUDENT_SHAPE, dolly_calibration, dolly_examples, pruned_pair, tiny_with_tokenizer

from cbd_engine.data.batches import collate
from cbd_engine.distillation.interpolation import LineStep, LineTraining, line_target
from cbd_engine.distillation.step import StudentLoss, accumulate_gradients
from cbd_engine.materialization.anchor import Anchor
from cbd_engine.materialization.recipe import materialize
from cbd_engine.nn.loading import load_model, load_tokenizer, output_head
from cbd_engine.pipelines.chain import build_chain
from cbd_engine.spec.chain import InterpolationSpec, parse_spec
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.estimate import estimate_chain_seconds

SMALL_SHAPE = PAIR_STUDENT_SHAPE
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calibration():
    return dolly_calibration()


@pytest.fixture(scope="module")
def pair(tmp_path_factory, calibration):
    """(teacher, student): the student pruned from the teacher (its cbd.json records the lineage), then moved off
    the teacher's weights, as distillation moves it, so that a leak of either anchor into the other would show."""
    teacher, student = pruned_pair(tmp_path_factory.mktemp("line"), calibration)
    model = load_model(student)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(student)
    return teacher, student


def _batch(folder):
    tokenizer = load_tokenizer(folder)
    ids = torch.tensor([tokenizer("Give three tips for staying healthy. Eat well and sleep.")["input_ids"]])
    return ids, torch.ones_like(ids)


def _mixed_logits(target, student, ids, mask):
    hidden, head = target.hidden_states(dict(student.named_parameters()), ids, mask)
    return head(hidden)


def test_the_line_ends_are_the_two_anchors(pair, calibration):
    teacher_dir, student_dir = pair
    small, large = Anchor.load(student_dir), Anchor.load(teacher_dir)
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    ids, mask = _batch(teacher_dir)
    with torch.no_grad():
        at_teacher = line_target(small, large, large.shape, 0.0, calibration, CPU)
        torch.testing.assert_close(_mixed_logits(at_teacher, student, ids, mask), teacher(ids).logits)
        at_student = line_target(small, large, small.shape, 1.0, calibration, CPU)
        torch.testing.assert_close(_mixed_logits(at_student, student, ids, mask), student(ids).logits)
        # between: neither anchor
        middle = line_target(small, large, large.shape, 0.5, calibration, CPU)
        assert not torch.allclose(_mixed_logits(middle, student, ids, mask), teacher(ids).logits, atol=1e-3)


def test_the_mix_is_what_the_materializer_writes(pair, calibration, tmp_path):
    teacher_dir, student_dir = pair
    small, large = Anchor.load(student_dir), Anchor.load(teacher_dir)
    line = LineTraining.build(InterpolationSpec(points=1), teacher_dir, student_dir, calibration, CPU)
    target = line.targets[0]
    written = materialize(tmp_path / "m", small=student_dir, large=teacher_dir, shape=target.shape,
                          alpha=target.alpha, calibration=calibration, dtype="float32")
    ids, mask = _batch(teacher_dir)
    with torch.no_grad():
        torch.testing.assert_close(_mixed_logits(target, load_model(student_dir), ids, mask),
                                   load_model(written.out)(ids).logits)
    assert small.params < target.params < large.params and 0 < target.alpha < 1


def test_gradients_reach_the_student_and_not_the_teacher(pair, calibration):
    teacher_dir, student_dir = pair
    line = LineTraining.build(InterpolationSpec(points=2), teacher_dir, student_dir, calibration, CPU)
    teacher = load_model(teacher_dir).eval().requires_grad_(False)
    config = DistillConfig(loss="forward_kl")
    batch = collate(dolly_examples(teacher_dir, train_rows=4).train, 0)

    def grads(step: LineStep | None) -> dict[str, torch.Tensor]:
        student = load_model(student_dir)
        *_, path_sums = accumulate_gradients(StudentLoss(student, config.loss_config), teacher, [batch], config, CPU,
                                             False, False, step)
        assert (path_sums.get("line", 0) > 0) == (step is not None)
        return {name: p.grad.clone() for name, p in student.named_parameters()}

    plain, with_line = grads(None), grads(LineStep(line, line.targets[0]))
    assert all(g.abs().sum() > 0 for g in with_line.values())
    changed = [name for name in plain if not torch.allclose(plain[name], with_line[name])]
    assert "model.embed_tokens.weight" in changed and len(changed) > len(plain) // 2
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is None for target in line.targets for p in target.model.parameters())
    assert output_head(teacher).weight.grad is None


def test_spec_checks_the_option():
    base = {"source": "x", "anchors": [{"size": "1M"}], "dataset": {"path": "d.jsonl"}}
    assert parse_spec(base).interpolation is None  # off by default
    line = {**base, "distillation": {"interpolation": {"kind": "line"}}}
    assert estimate_chain_seconds(line) > estimate_chain_seconds(base)  # the mix's passes are counted
    spec = parse_spec({**base, "distillation": {"interpolation": {"kind": "line", "weight": 0.5}}})
    assert spec.interpolation == InterpolationSpec("line", 0.5, 4)
    for bad, match in (({"kind": "slimmable"}, "kind"), ({"kind": "line", "weight": 0}, "weight"),
                       ({"kind": "line", "points": 0}, "points"), ({"kind": "line", "alpha": 1}, "unknown")):
        with pytest.raises(ValueError, match=match):
            parse_spec({**base, "distillation": {"interpolation": bad}})


def test_a_chain_built_with_line_training_records_it(tmp_path):
    source = tiny_with_tokenizer(tmp_path / "source", seed=3, num_hidden_layers=3, hidden_size=64,
                                 intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    spec = {"name": "tiny", "source": str(source), "bridge": None, "anchors": [{"shape": SMALL_SHAPE}],
            "dataset": {"path": str(DOLLY), "prompt_format": "alpaca"}, "device": "cpu",
            "distillation": {"steps": 3, "batch_size": 4, "max_length": 64, "learning_rate": 3e-3, "eval_rows": 6,
                             "interpolation": {"kind": "line", "weight": 1.0, "points": 2}}}
    chain = build_chain(spec, tmp_path / "chain")
    anchor = chain.anchors[1].path
    record = json.loads((anchor / "cbd.json").read_text())["distillation"]["interpolation"]
    assert record["kind"] == "line" and record["weight"] == 1.0 and len(record["targets"]) == 2
    assert json.loads((tmp_path / "chain" / "spec.json").read_text())["distillation"]["interpolation"]["kind"] == "line"
    curve = (anchor / "loss_curve.csv").read_text().splitlines()
    assert "line_divergence" in curve[0]
    between = materialize(tmp_path / "between", small=anchor, large=chain.anchors[0].path,
                          shape={**SMALL_SHAPE, "intermediate_size": 96}, alpha=0.5, dtype="float32")
    assert between.provenance["interpolation_training"] == {"kind": "line", "weight": 1.0, "points": 2,
                                                            "matches_mix": True}
