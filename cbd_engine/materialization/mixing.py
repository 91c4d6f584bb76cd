"""Mixing two aligned anchors into one model of the target shape: the paper's Eq. 3, and the per-unit mix.

E(small) and S(large) are both transformed to the target shape (transforms.py), units aligned; then, entry
by entry of every tensor, with alpha the weight of the smaller anchor:

  unit (the default): alpha * E + (1 - alpha) * S where both anchors have the entry's units, and the one anchor's own
      weight, unscaled, where only it has them. Norm gains are not rescaled by sqrt(d/d') (that rescale keeps a
      *pure* expansion's function; here the larger anchor's own channels fill the width). So two anchors that agree
      on their shared units give the same model at every alpha, and alpha only moves what both carry.
  paper: alpha * E + (1 - alpha) * S everywhere (Eq. 3). A unit only the larger anchor has is scaled by (1 - alpha)
      and mixed with E's fill (zero readers, random producers): measured on two anchors that agree exactly on their
      shared units, held-out loss 5.32 at alpha 0 rises to 7.41 at alpha 1 (docs/ENGINE.md, "Mixing").

Both are `lerp(base, other, alpha)` on a mask of mixed entries and `base` elsewhere (`PairTensor`): exact at alpha 0
(base: S) and 1 (other: E), and linear in alpha, so `alpha_search` builds any candidate from (base, other, mask).
Alphas may differ by group of tensors (`GROUPS`: attention, MLP, embeddings and norms).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cbd_engine.materialization.anchor import Term
from cbd_engine.materialization.transforms import grown_eps
from cbd_engine.spec.families import Architecture, TensorSpec
from cbd_engine.spec.options import GROUPS, MIXES

Alphas = dict[str, float]  # group -> weight of the smaller anchor


def uniform(alpha: float) -> Alphas:
    return dict.fromkeys(GROUPS, alpha)


def tensor_group(arch: Architecture, spec: TensorSpec) -> str:
    """attention / mlp: the tensors of the module holding the attention (MLP) output projection; the rest
    (embeddings, norms, output layer) embeddings_norms."""
    for group, module in (("attention", arch.attn_out_module), ("mlp", arch.ffn_out_module)):
        if spec.name.startswith(module.rsplit(".", 1)[0] + "."):
            return group
    return "embeddings_norms"


@dataclass
class PairTensor:
    """One target tensor of a pair: lerp(base, other, alpha) where `mixed` (None: everywhere), base elsewhere."""

    base: torch.Tensor  # S, or E where only E has the unit
    other: torch.Tensor  # E
    mixed: torch.Tensor | None

    def at(self, alpha: float) -> torch.Tensor:
        blend = torch.lerp(self.base, self.other, alpha)  # exact at 0 (base) and 1 (other)
        return blend if self.mixed is None else torch.where(self.mixed, blend, self.base)


@dataclass
class Pair:
    small: Term  # E: the smaller anchor, expanded (or subset) to the target
    large: Term  # S: the larger anchor, subset to the target
    mix: str

    def __post_init__(self) -> None:
        if self.mix not in MIXES:
            raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {self.mix!r}")

    def tensor(self, spec: TensorSpec, name: str, layer_index: int | None, seed: int,
               rows: tuple[int, int] | None = None) -> PairTensor:
        rescale = self.mix == "paper"
        e = self.small.tensor(spec, name, layer_index, seed, rows, rescale_gains=rescale).float()  # lerp in float32
        s = self.large.tensor(spec, name, layer_index, seed, rows, rescale_gains=rescale).float()
        if self.mix == "paper":
            return PairTensor(s, e, None)
        in_e, in_s = self.small.presence(e.shape, spec, layer_index), self.large.presence(s.shape, spec, layer_index)
        return PairTensor(torch.where(in_s | ~in_e, s, e), e, in_e & in_s)

    def eps(self, alphas: Alphas, target) -> float:
        """The norm epsilon: the anchors' own, mixed like the norm gains; the paper's mix grows each with its width."""
        e, s = self.small.anchor.spec.eps, self.large.anchor.spec.eps
        if self.mix == "paper":
            e, s = grown_eps(e, self.small.plan, target), grown_eps(s, self.large.plan, target)
        alpha = alphas["embeddings_norms"]
        return alpha * e + (1 - alpha) * s
