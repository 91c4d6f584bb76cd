"""Nested training (issue 20, part 2): the nested order keeps the function, every width is a slice, its gradients
reach the one set of weights, and a chain built with it writes anchor i+1 as anchor i's first units, which the
materializer then slices between."""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from conftest import DOLLY
from distill_helpers import PAIR_STUDENT_SHAPE, dolly_calibration, dolly_examples, pruned_pair, tiny_with_tokenizer

from cbd_engine.data.batches import collate
from cbd_engine.distillation.nested import NestedTraining
from cbd_engine.distillation.step import StudentLoss, accumulate_gradients
from cbd_engine.materialization.anchor import Anchor
from cbd_engine.materialization.recipe import materialize
from cbd_engine.nn.loading import load_model, load_tokenizer
from cbd_engine.pipelines.chain import build_chain
from cbd_engine.pipelines.nested import write_nested_start
from cbd_engine.spec.chain import InterpolationSpec, parse_spec
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.estimate import estimate_chain_seconds
from cbd_engine.spec.progress import Cancelled
from cbd_engine.spec.shapes import Shape
from worker.model_card import _trained_path

MIDDLE = {"num_layers": 3, "hidden_size": 64, "num_heads": 4, "num_kv_heads": 2, "head_dim": 16,
          "intermediate_size": 96}
SMALL = PAIR_STUDENT_SHAPE
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def calibration():
    return dolly_calibration()


@pytest.fixture(scope="module")
def nested_pair(tmp_path_factory, calibration):
    """(teacher, its nested start, the student pruned from the teacher): every width axis shrinks."""
    root = tmp_path_factory.mktemp("nested")
    teacher, student = pruned_pair(root, calibration)
    start = root / "start"
    write_nested_start(teacher, student, start, calibration, seed=0)
    return teacher, start, student


def _ids(folder):
    tokenizer = load_tokenizer(folder)
    return torch.tensor([tokenizer("Give three tips for staying healthy. Eat well and sleep.")["input_ids"]])


def _logits(training: NestedTraining, whole: torch.nn.Module, shape: Shape, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return training.module_at(whole, shape)(ids).logits


def test_the_nested_order_keeps_the_function_and_its_smallest_width_is_the_pruned_start(nested_pair):
    teacher, start, student = nested_pair
    ids = _ids(teacher)
    whole = load_model(start)
    with torch.no_grad():
        torch.testing.assert_close(whole(ids).logits, load_model(teacher)(ids).logits)  # a reordering only
        training = NestedTraining.build(InterpolationSpec("nested"), start, Anchor.load(student).shape, CPU)
        torch.testing.assert_close(_logits(training, whole, training.smallest, ids), load_model(student)(ids).logits)


def test_widths_are_slices_with_gradients_into_the_whole(nested_pair):
    _, start, student = nested_pair
    training = NestedTraining.build(InterpolationSpec("nested", weight=0.5), start, Anchor.load(student).shape, CPU)
    shapes = {training.random_shape(random.Random(seed)) for seed in range(20)}
    assert len(shapes) > 2 and all(training.arch.num_params(training.smallest) <= training.arch.num_params(s)
                                   <= training.arch.num_params(training.root) for s in shapes)
    whole = load_model(start)
    middle = Shape.from_dict(MIDDLE, chain=training.root)
    width = training.width(middle)
    assert not any(p.device.type != "meta" for p in width.model.parameters())  # no copy of the weights is kept
    state = width.parameters_from(dict(whole.named_parameters()))
    assert torch.equal(state["model.layers.0.mlp.down_proj.weight"],
                       whole.model.layers[0].mlp.down_proj.weight[:, :96])  # the first FFN units
    teacher = load_model(start).eval().requires_grad_(False)
    config = DistillConfig(loss="forward_kl")
    batch = collate(dolly_examples(start, train_rows=4).train, 0)
    step = training.step(random.Random(0))
    assert step.weights == {"smallest": 1.0, "random": 0.5}
    *_, sums = accumulate_gradients(StudentLoss(whole, config.loss_config), teacher, [batch], config, CPU, False,
                                    False, step)
    assert sums["smallest"] > 0 and set(sums) == {"smallest", "random"}
    grad = whole.model.layers[0].mlp.down_proj.weight.grad
    assert grad[:, : SMALL["intermediate_size"]].abs().sum() > 0  # the smallest width's units: every term
    assert all(p.grad is None for p in teacher.parameters())


def test_spec_takes_nested_and_the_estimate_counts_its_widths():
    base = {"source": "x", "anchors": [{"size": "2M"}, {"size": "1M"}], "dataset": {"path": "d.jsonl"}}
    nested = {**base, "distillation": {"interpolation": {"kind": "nested"}}}
    line = {**base, "distillation": {"interpolation": {"kind": "line"}}}
    assert parse_spec(nested).interpolation == InterpolationSpec("nested", 1.0, 4)
    assert estimate_chain_seconds(nested) > estimate_chain_seconds(line) > estimate_chain_seconds(base)


def test_a_nested_chain_writes_the_smaller_anchor_as_the_larger_ones_first_units(tmp_path):
    source = tiny_with_tokenizer(tmp_path / "source", seed=3, num_hidden_layers=3, hidden_size=96,
                                 intermediate_size=160, num_attention_heads=6, num_key_value_heads=3)
    spec = _tiny_nested_spec(source)
    first = spec["anchors"][0]["shape"]
    before = tmp_path / "anchor-1-before"
    chain = build_chain({**spec, "anchors": spec["anchors"][:1]}, before)  # the same first link, alone
    chain = build_chain(spec, tmp_path / "chain")
    whole, smallest = chain.anchors[1].path, chain.anchors[2].path
    assert sorted(p.name for p in (tmp_path / "chain").iterdir()) == [
        "anchor-00", "anchor-01", "anchor-02", "chain.json", "spec.json"]  # nothing half-written is left
    record = json.loads((smallest / "cbd.json").read_text())
    assert record["distillation"]["interpolation"] == {"kind": "nested", "weight": 1.0, "points": 4}
    assert record["nested"]["slice_of"] == str(whole)
    assert json.loads((whole / "cbd.json").read_text())["distillation"]["nested_training"]["slice_anchor_index"] == 2
    assert "smallest_divergence" in (smallest / "loss_curve.csv").read_text().splitlines()[0]
    # the first link is a plain distillation (the source never changes); the second trained anchor 1 again
    ids = _ids(whole)
    with torch.no_grad():
        assert not torch.allclose(load_model(whole)(ids).logits, load_model(before / "anchor-01")(ids).logits)
    chain_json = json.loads((tmp_path / "chain" / "chain.json").read_text())
    metrics = json.loads((whole / "metrics.json").read_text())
    assert chain_json["anchors"][1]["metrics"] == metrics and metrics["dev_loss"] == metrics["dev_loss_largest"]
    # the slice: anchor 2's weights are anchor 1's first units, and a size between them is a slice whatever alpha
    large, small = load_model(whole).state_dict(), load_model(smallest).state_dict()
    assert torch.equal(small["model.layers.1.mlp.up_proj.weight"], large["model.layers.1.mlp.up_proj.weight"][:64, :48])
    between = materialize(tmp_path / "between", small=smallest, large=whole, shape=MIDDLE, dtype="float32")
    assert between.alpha == 0.0 and between.provenance["alignment"]["nested"]
    assert between.provenance["interpolation_training"] == {"kind": "nested", "weight": 1.0, "slice": True,
                                                            "matches_mix": True}
    written = load_model(between.out).state_dict()
    assert torch.equal(written["model.layers.2.mlp.gate_proj.weight"],
                       large["model.layers.2.mlp.gate_proj.weight"][:96])
    other = materialize(tmp_path / "other", small=smallest, large=whole, shape=MIDDLE, alpha=0.7, dtype="float32")
    assert all(torch.equal(tensor, load_model(other.out).state_dict()[name]) for name, tensor in written.items())
    # anchor 1's lineage from the source was composed with the reordering: it still aligns, so alpha 1 at its own
    # shape gives anchor 1 back
    own = materialize(tmp_path / "own", small=whole, large=chain.anchors[0].path, shape=first, alpha=1.0,
                      dtype="float32")
    assert own.provenance["alignment"]["method"] == "lineage"
    with torch.no_grad():
        torch.testing.assert_close(load_model(own.out)(ids).logits, load_model(whole)(ids).logits)


def _tiny_nested_spec(source) -> dict:
    first = {**MIDDLE, "intermediate_size": 128}
    return {"name": "tiny", "source": str(source), "bridge": None, "anchors": [{"shape": first}, {"shape": SMALL}],
            "dataset": {"path": str(DOLLY), "prompt_format": "alpaca"}, "device": "cpu",
            "distillation": {"steps": 3, "batch_size": 4, "max_length": 64, "learning_rate": 3e-3, "eval_rows": 6,
                             "interpolation": {"kind": "nested", "weight": 1.0}}}


def test_an_interrupted_nested_link_resumes_to_the_same_anchors(tmp_path, monkeypatch):
    source = tiny_with_tokenizer(tmp_path / "source", seed=3, num_hidden_layers=3, hidden_size=96,
                                 intermediate_size=160, num_attention_heads=6, num_key_value_heads=3)
    spec = _tiny_nested_spec(source)
    whole = build_chain(spec, tmp_path / "whole")
    calls = []

    def stop_in_the_nested_stage() -> bool:  # 2 steps into the nested stage
        if (tmp_path / "resumed" / "anchor-02.nested-start").is_dir():
            calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        build_chain(spec, tmp_path / "resumed", should_stop=stop_in_the_nested_stage)
    assert not (tmp_path / "resumed" / "anchor-02").exists()
    moved = []
    real_replace = os.replace

    def fail_after_two(source_path, target_path):  # the trained whole half moved over anchor 1
        if len(moved) == 2:
            raise OSError("stopped")
        moved.append(source_path)
        real_replace(source_path, target_path)

    monkeypatch.setattr("cbd_engine.pipelines.nested.os.replace", fail_after_two)
    with pytest.raises(OSError, match="stopped"):
        build_chain(spec, tmp_path / "resumed", resume=True)
    monkeypatch.undo()
    resumed = build_chain(spec, tmp_path / "resumed", resume=True)
    for ours, theirs in zip(resumed.anchors[1:], whole.anchors[1:], strict=True):
        mine, other = load_model(ours.path).state_dict(), load_model(theirs.path).state_dict()
        assert all(torch.equal(tensor, other[name]) for name, tensor in mine.items())
        assert ours.metrics["validation_loss"] == theirs.metrics["validation_loss"]


def test_the_model_card_says_a_nested_model_is_a_slice():
    text = _trained_path({"kind": "nested", "weight": 1.0, "slice": True, "matches_mix": True}, "unit")
    assert "first units" in text and "nested widths" in text
    assert _trained_path(None, "unit").startswith("not trained")
