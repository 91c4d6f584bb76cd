"""Nested training (issue 20, `distillation.interpolation: {"kind": "nested"}`): anchor i+1 becomes a slice of
anchor i, and the two, with every width between them, are trained as one set of weights, so that a size between the
anchors is a slice the service cuts out (no mix, no alpha to choose).

The order. Anchor i+1 starts pruned from anchor i (its lineage: the units it kept). Before training, anchor i's units
are reordered along every width axis (residual channels, KV groups, query heads within a group, FFN neurons per
layer): the units anchor i+1 kept first, the rest by the activation importance that chose them (`nested_order`). A
permutation of units computes the same function (RMSNorm's statistics do not depend on the channel order), so nothing
is lost, and afterwards every width is a prefix: the model of a shape T between the anchors is the first units of
every axis, `build_plan(root, T, None)`, which is the plan the materializer makes for a pair whose smaller anchor is
such a slice (planning.plan_pair). Anchor i+1's start is exactly its pruned start.

The step: the sandwich rule and in-place distillation of universally slimmable networks (Yu & Huang, ICCV 2019):

    loss = D(anchor i, frozen || largest) + D(largest || smallest) + weight * D(largest || random width)

The largest width is the whole set of weights, held to anchor i by its frozen copy (so the anchor's own loss does not
drift); the smallest is anchor i+1's shape; the random width is the size rule's shape for a size drawn uniformly in
parameters between the anchors (a shape the service would make). The two smaller widths learn from the largest width's
outputs of the same step, detached: in-place distillation, the teacher's forward reused for the largest only. All
three gradients reach the one set of weights. The dev loss that keeps a checkpoint is the mean of the largest and the
smallest width's.

Cost per step, in multiply-adds per token and parameter: the frozen copy's forward (1 x P_i), forward and backward
of the largest (3 x P_i), the smallest (3 x P_i+1) and the random width (3 x P_T, on average the anchors' mean). For
101M -> 68M: 865M against a plain link's 306M (teacher forward and student forward and backward), 2.8x. Memory: the
optimizer state of anchor i rather than anchor i+1, and each width's gathered copy of its parameters while it runs.
What it changes: anchor i (the link's teacher, never the source: a chain's first link, from the source, is distilled
as usual), which the chain writes again after the link (pipelines/chain.py); anchors of a ready chain never change.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cbd_engine.distillation.interpolation import ComputedHead, MixedTensor, functional_hidden_states, gather_of
from cbd_engine.materialization.importance import Importance
from cbd_engine.materialization.planning import build_plan
from cbd_engine.materialization.transforms import NEW, LayerMap, Plan, priority
from cbd_engine.nn.loading import output_head
from cbd_engine.nn.losses import LossConfig, chunked_token_losses
from cbd_engine.spec.chain import InterpolationSpec
from cbd_engine.spec.families import Architecture, ModelSpec, read_config
from cbd_engine.spec.shapes import Shape, solve_shape


def nested_order(shape: Shape, kept: Plan, importance: Importance) -> Plan:
    """A plan from `shape` to itself that puts, along every width axis, the units `kept` (the smaller anchor's
    lineage) keeps first, in its order, and the rest after them by importance; depth must not change."""
    if len(kept.layers) != shape.num_layers or any(layer.fresh or layer.source != k
                                                   for k, layer in enumerate(kept.layers)):
        raise ValueError("nested training needs the two anchors to have one depth (the chain prunes width only): "
                         "a slice keeps every layer")
    group = shape.group_size
    layers = []
    for k, cut in enumerate(kept.layers):
        heads_scores = importance.heads[k] if importance.heads else None
        group_scores = [sum(heads_scores[g * group : (g + 1) * group]) for g in range(shape.num_kv_heads)] \
            if heads_scores else None
        kv_heads = priority(shape.num_kv_heads, cut.kv_heads, group_scores)
        heads = []
        for g in kv_heads:
            members = [h - g * group for h in cut.heads if h != NEW and h // group == g]
            local = heads_scores[g * group : (g + 1) * group] if heads_scores else None
            heads += [g * group + h for h in priority(group, members, local)]
        ffn = priority(shape.intermediate_size, cut.ffn, importance.ffn[k] if importance.ffn else None)
        layers.append(LayerMap(k, False, heads, kv_heads, ffn))
    return Plan(priority(shape.hidden_size, kept.residual, importance.residual), layers)


def slice_plan(root: Shape, width: Shape) -> Plan:
    """The first units of every axis of `root` at `width`: no scores, no lineage (transforms.select_units)."""
    return build_plan(root, width, None)


@dataclass
class Width:
    """One width of the nested weights: a model of its shape whose parameters are never allocated (only its buffers,
    the rotary tables, are real) and each tensor's gather from the whole model's."""

    shape: Shape
    params: int
    model: nn.Module
    gathers: dict[str, MixedTensor]

    def parameters_from(self, root: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: gather.gather(root) for name, gather in self.gathers.items()}


@dataclass
class NestedTraining:
    """The nested widths between a link's teacher (the whole, trained) and its pruned student (the smallest
    width): the widths' models and the loss terms of one step."""

    spec: InterpolationSpec
    model_spec: ModelSpec
    root: Shape
    smallest: Shape
    device: torch.device
    widths: dict[Shape, Width] = field(default_factory=dict)

    @classmethod
    def build(cls, spec: InterpolationSpec, root_dir: Path, smallest: Shape, device: torch.device) -> NestedTraining:
        """`root_dir`: the teacher in nested order (its smallest width is the student's start)."""
        model_spec = ModelSpec.from_config(read_config(root_dir))
        return cls(spec, model_spec, model_spec.shape, smallest, device)

    @property
    def arch(self) -> Architecture:
        return self.model_spec.architecture

    def describe(self) -> dict:
        """What the anchors' cbd.json record."""
        arch = self.arch
        return {**self.spec.to_dict(), "rule": "sandwich: largest (held by its frozen copy), smallest, one random "
                                               "width; the smaller ones distilled from the largest in place",
                "largest": {"shape": self.root.to_dict(), "params": arch.num_params(self.root)},
                "smallest": {"shape": self.smallest.to_dict(), "params": arch.num_params(self.smallest)}}

    def width(self, shape: Shape) -> Width:
        """The width of `shape` (made once: an empty model and its gathers)."""
        if shape not in self.widths:
            plan = slice_plan(self.root, shape)
            gathers = {name: gather_of(spec, plan, layer, self.root, self.device)
                       for name, spec, layer in self.arch.tensor_names(shape)}
            self.widths[shape] = Width(shape, self.arch.num_params(shape), self._empty_model(shape), gathers)
        return self.widths[shape]

    def _empty_model(self, shape: Shape) -> nn.Module:
        """A model of `shape` without allocated parameters (accelerate's empty init: they are the gathers'), its
        buffers on the device."""
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**self.model_spec.config_for(shape)))
        if shape.tie_word_embeddings:
            model.tie_weights()  # from_config leaves a head of its own under the empty init
        for module in model.modules():
            for key, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[key] = buffer.to(self.device)
        return model.eval()

    def random_shape(self, rng: random.Random) -> Shape:
        """The size rule's shape for a size drawn uniformly between the smallest and the largest width."""
        small, large = self.arch.num_params(self.smallest), self.arch.num_params(self.root)
        return solve_shape(self.arch, self.smallest, self.root, round(small + rng.random() * (large - small)))

    def step(self, rng: random.Random) -> NestedStep:
        return NestedStep(self, {"smallest": self.width(self.smallest), "random": self.width(self.random_shape(rng))})

    def selection(self, student: nn.Module, dev_loss: float, dev_loss_of: Callable[[nn.Module], float]) -> dict:
        """The mean of the whole's and the smallest width's dev loss keeps the checkpoint: the link is for both."""
        smallest = dev_loss_of(self.module_at(student, self.smallest))
        return {"dev_loss": (dev_loss + smallest) / 2, "dev_loss_largest": dev_loss, "dev_loss_smallest": smallest}

    def module_at(self, root: nn.Module, shape: Shape) -> nn.Module:
        """The width `shape` of the whole model `root` as a model of its own (a copy; for the dev loss)."""
        width = self.width(shape)
        with torch.no_grad():
            state = {name: tensor.detach().clone() for name, tensor in
                     width.parameters_from(dict(root.named_parameters())).items()}
        model = self._empty_model(shape)
        model.load_state_dict(state, strict=False, assign=True)
        if shape.tie_word_embeddings:
            model.tie_weights()
        return model


@dataclass
class NestedStep:
    """Nested training's part of one step (distillation/step.py adds its weighted sums to the loss): the smallest
    and the drawn width, each against the whole model's outputs of the step, detached."""

    training: NestedTraining
    parts: dict[str, Width]

    @property
    def weights(self) -> dict[str, float]:
        return {"smallest": 1.0, "random": self.training.spec.weight}

    def stats(self) -> dict:
        return {"random_params": self.parts["random"].params}

    def sums(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
             targets: torch.Tensor, teacher_hidden, teacher_head: nn.Module | None, student_hidden: torch.Tensor,
             config: LossConfig) -> dict[str, torch.Tensor]:
        """Each width's divergence sum over the scored tokens from the whole model (in-place distillation)."""
        root = dict(student.named_parameters())
        largest_hidden = student_hidden.detach()
        largest_head = ComputedHead(output_head(student).weight.detach())
        result = {}
        for part, width in self.parts.items():
            hidden, head = functional_hidden_states(width.model, width.parameters_from(root), input_ids,
                                                    attention_mask)
            result[part], _ = chunked_token_losses(hidden[scored], head, targets, largest_hidden, largest_head, config,
                                                   need_ce=False)
        return result
