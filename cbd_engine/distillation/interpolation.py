"""Line training (issue 20, `distillation.interpolation: {"kind": "line"}`): while anchor i+1 (the student) is
distilled from anchor i (the frozen teacher), each step also trains the path between them, so that the sizes the
service later materializes between the two anchors are good as materialized.

The math. The materializer's per-unit mix (materialization/mixing.py) at a target shape T between the anchors is,
entry by entry of every tensor,

    theta_T(alpha) = where(m_T, (1 - alpha) * S_T + alpha * E_T(student), S_T)

with S_T the teacher subset to T (plan_s: index maps only, since T is inside the larger anchor's shape), E_T the
student gathered to T by plan_e (index maps from the lineage: the student was pruned from the teacher, so unit u of
the student sits where the teacher unit it came from sits), and m_T the entries the student has (transforms.presence).
Both plans are the ones `plan_pair` makes when `POST /models` materializes T later (same lineage, same importance of
the teacher on the chain's calibration), so training and serving build the same function. theta_T is a gather and a
weighted sum of the student's parameters: differentiable, with gradients reaching the student only (S_T is a
constant). Each step adds `weight` x the distillation loss of theta_T against anchor i (the teacher whose outputs the
step has computed already) on the step's batch:

    loss = D(teacher || student) + weight * D(teacher || theta_T(alpha_T))

Which T and alpha. `points` target shapes are fixed at the parameter fractions (2k + 1) / (2 points) between the
anchors (4 points: 1/8, 3/8, 5/8, 7/8 of the way; none of them the sizes RESULTS.md scores), one drawn per step.
alpha is the target's parameter-proportional one, alpha_T = (P_large - P_T) / (P_large - P_small): the one point of
the (size, alpha) plane the line passes through at each size, from the teacher (alpha 0 at its shape) to the student
(alpha 1 at its shape), as "Learning Neural Network Subspaces" trains a line between two endpoints. A random alpha
per step would spread the same steps over a plane of which the service uses one alpha per size; `auto` still chooses
alpha at serve time, from a path now trained near alpha_T.

Cost, per step: one forward and backward of a model of size P_T (about the mean of the anchors), the gather (one read
of the student's parameters) and the mix, and nothing for the teacher (its hidden states are the step's). Against a
plain step (teacher forward, student forward and backward) that is 3 P_T / (P_teacher + 3 P_student) more: 0.81x
for SmolLM2-135M -> 100M (P_T 118M), 0.83x for 100M -> 70M, so a line step costs about 1.8 plain steps, once for
every size between the anchors (docs/RESULTS.md, "Line training", measures the seconds).
Memory: each target's S_T held once (the target model instance's own parameters): about `points` x P_T floats.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from cbd_engine.data.calibration import Calibration
from cbd_engine.materialization.anchor import Anchor, Term
from cbd_engine.materialization.planning import ImportanceSource, plan_pair
from cbd_engine.materialization.recipe import proportional_alpha
from cbd_engine.materialization.transforms import Plan, row_index
from cbd_engine.nn.loading import output_head
from cbd_engine.nn.losses import LossConfig, chunked_token_losses
from cbd_engine.spec.chain import InterpolationSpec
from cbd_engine.spec.families import TensorSpec
from cbd_engine.spec.shapes import Shape, solve_shape


@dataclass
class MixedTensor:
    """One tensor of a target: the student tensor it gathers (`source`), the index per dimension (None: kept),
    and where the student has the entry (None: everywhere)."""

    source: str
    index: list[torch.Tensor | None]
    mask: torch.Tensor | None

    def gather(self, student: dict[str, torch.Tensor]) -> torch.Tensor:
        tensor = student[self.source]
        for dim, index in enumerate(self.index):
            if index is not None:
                tensor = tensor.index_select(dim, index)
        return tensor


@dataclass
class LineTarget:
    """One target shape of the line: a model instance whose own (frozen) parameters are S_T, the mixed tensors, and
    the target's alpha."""

    shape: Shape
    params: int
    alpha: float
    model: nn.Module
    mixed: dict[str, MixedTensor]  # by the model's parameter name; tensors the student has no entry of are absent

    def parameters_with(self, student: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """theta_T(alpha) for every tensor the student reaches (the others stay S_T, the model's own)."""
        own = dict(self.model.named_parameters())
        result = {}
        for name, tensor in self.mixed.items():
            blend = torch.lerp(own[name], tensor.gather(student), self.alpha)  # exact at alpha 0 and 1
            result[name] = blend if tensor.mask is None else torch.where(tensor.mask, blend, own[name])
        return result

    def hidden_states(self, student: dict[str, torch.Tensor], input_ids: torch.Tensor,
                      attention_mask: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
        """The mixed model's final hidden states and its output layer (the mixed head weight as its one input)."""
        return functional_hidden_states(self.model, self.parameters_with(student), input_ids, attention_mask)


def functional_hidden_states(model: nn.Module, params: dict[str, torch.Tensor], input_ids: torch.Tensor,
                             attention_mask: torch.Tensor) -> tuple[torch.Tensor, nn.Module]:
    """`model` run with `params` in place of its own parameters (those not given: its own): the final hidden states
    and the output layer, its weight the given head tensor when there is one."""
    base = model.base_model
    prefix = model.base_model_prefix + "."
    inside = {name[len(prefix):]: value for name, value in params.items() if name.startswith(prefix)}
    hidden = functional_call(base, inside, args=(), kwargs={"input_ids": input_ids,
                                                            "attention_mask": attention_mask}).last_hidden_state
    head = output_head(model).weight
    return hidden, ComputedHead(params.get(_parameter_name(model, head), head))


class ComputedHead(nn.Module):
    """An output layer whose weight is a computed tensor (the mix of the heads): `chunked_token_losses` takes the
    gradient with respect to its parameters, here that tensor, from which autograd carries it on to the student."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = weight  # a plain attribute, not an nn.Parameter: it is a function of the student's

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight)

    def parameters(self, recurse: bool = True):
        yield self.weight


@dataclass
class LineTraining:
    """The line between a teacher anchor and its pruned student: the targets, and the loss term of one step."""

    spec: InterpolationSpec
    targets: list[LineTarget]

    @classmethod
    def build(cls, spec: InterpolationSpec, teacher_dir: Path, student_dir: Path, calibration: Calibration,
              device: torch.device, seed: int = 0) -> LineTraining:
        """Plans for `spec.points` targets between the anchors. `student_dir` must record its lineage from
        `teacher_dir` (cbd.json): the pruned start of the student, whose units keep their places while it trains."""
        small, large = Anchor.load(student_dir), Anchor.load(teacher_dir)
        arch = large.spec.architecture
        targets = []
        for fraction in spec.fractions():
            size = round(small.params + fraction * (large.params - small.params))
            shape = solve_shape(arch, small.shape, large.shape, size)
            alpha = proportional_alpha(small.params, large.params, arch.num_params(shape))
            targets.append(line_target(small, large, shape, alpha, calibration, device, seed))
        return cls(spec, targets)

    def describe(self) -> dict:
        """What the anchor's cbd.json records."""
        return {**self.spec.to_dict(), "alpha": "proportional",
                "targets": [{"shape": t.shape.to_dict(), "params": t.params, "alpha": round(t.alpha, 4)}
                            for t in self.targets]}

    def step(self, rng: random.Random) -> LineStep:
        """This step's part: one target, drawn by `rng`."""
        return LineStep(self, self.targets[rng.randrange(len(self.targets))])

    def selection(self, student: nn.Module, dev_loss: float, dev_loss_of: Callable[[nn.Module], float]) -> dict:
        """The anchor's own dev loss keeps its checkpoint."""
        return {"dev_loss": dev_loss}


@dataclass
class LineStep:
    """Line training's part of one step (distillation/step.py adds its weighted sums to the loss): the mixed model of
    the drawn target against the teacher."""

    training: LineTraining
    target: LineTarget

    @property
    def weights(self) -> dict[str, float]:
        return {"line": self.training.spec.weight}

    def stats(self) -> dict:
        return {"line_params": self.target.params}

    def sums(self, student: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, scored: torch.Tensor,
             targets: torch.Tensor, teacher_hidden, teacher_head: nn.Module | None, student_hidden: torch.Tensor,
             config: LossConfig) -> dict[str, torch.Tensor]:
        """The sum over scored tokens of the mixed model's divergence from the teacher (differentiable)."""
        hidden, head = self.target.hidden_states(dict(student.named_parameters()), input_ids, attention_mask)
        divergence, _ = chunked_token_losses(hidden[scored], head, targets, teacher_hidden, teacher_head, config,
                                             need_ce=False)
        return {"line": divergence}


def line_target(small_anchor: Anchor, large_anchor: Anchor, shape: Shape, alpha: float, calibration: Calibration,
                device: torch.device, seed: int = 0) -> LineTarget:
    """The target `shape` at `alpha`: the materializer's plans (`plan_pair`, aligned by the student's lineage), S_T
    loaded into a fresh model of the shape (frozen), and each tensor's gather from the student."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if small_anchor.spec.eps != large_anchor.spec.eps:  # the mix's epsilon would move with alpha; a chain keeps one
        raise ValueError("line training needs anchors with one norm epsilon")
    plan_e, plan_s, _ = plan_pair(small_anchor, large_anchor, shape, ImportanceSource(calibration), align="lineage")
    small, large = Term(small_anchor, plan_e), Term(large_anchor, plan_s)
    spec = large.anchor.spec
    config = AutoConfig.for_model(**spec.config_for(shape))
    model = AutoModelForCausalLM.from_config(config)
    arch = spec.architecture
    state, mixed = {}, {}
    for name, tensor_spec, layer_index in arch.tensor_names(shape):
        s = large.tensor(tensor_spec, name, layer_index, seed, rescale_gains=False)
        if not bool(large.presence(s.shape, tensor_spec, layer_index).all()):
            raise ValueError(f"{name}: the target is not inside the larger anchor's shape")
        state[name] = s
        present = small.presence(s.shape, tensor_spec, layer_index)
        if bool(present.any()):
            mixed[name] = gather_of(tensor_spec, small.plan, layer_index, small.anchor.shape, device,
                                    None if bool(present.all()) else present.to(device))
    model.load_state_dict(state, strict=False)
    if shape.tie_word_embeddings:
        model.tie_weights()
    return LineTarget(shape, arch.num_params(shape), alpha, model.to(device).requires_grad_(False), mixed)


def gather_of(spec: TensorSpec, plan: Plan, layer_index: int | None, source: Shape, device: torch.device,
              mask: torch.Tensor | None = None) -> MixedTensor:
    """The gather that takes one tensor of a model of shape `source` to its place in the target `plan` leads to (new
    rows read row 0: `mask` hides them)."""
    layer = plan.layers[layer_index] if layer_index is not None else None
    name = spec.name.format(layer=layer.source) if layer is not None else spec.name
    index = [None if i is None else i.clamp(min=0).to(device)
             for i in (row_index(axes, plan, layer, source) for axes in spec.dims)]
    return MixedTensor(name, index, mask)


def _parameter_name(model: nn.Module, parameter: torch.Tensor) -> str:
    return next(name for name, p in model.named_parameters() if p is parameter)
