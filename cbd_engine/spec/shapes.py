"""Model shapes, size strings and the size -> shape solver.

Torch-free on purpose: the API process parses sizes and solves shapes with this module and must never import torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Protocol

SHAPE_AXES = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "intermediate_size")
CHAIN_FIXED = ("vocab_size", "max_position_embeddings", "tie_word_embeddings")
FFN_MULTIPLE = 64
# A free hidden size moves in steps of 16 (for Llama itself: of lcm(heads, 8), as transformers requires it to divide):
# steps of 64 move a 49k-vocabulary embedding by 3M parameters at once, missing the 3% tolerance below ~100M.
HIDDEN_MULTIPLE = 16
SIZE_TOLERANCE = 0.03
PRUNE_ORDERS = ("ffn_first", "uniform")  # how one anchor is cut to a size (derived anchors); see solve_derived_shape
PRUNE_ORDER = "ffn_first"  # the default, measured in docs/DISTILLATION.md ("The anchor recipe")
FFN_KEEP = 0.5  # ffn_first: the FFN alone is cut down to this fraction of its width before anything else


class ShapeError(ValueError):
    """A shape or size that cannot be served; the message names the field and the allowed range."""


@dataclass(frozen=True)
class Shape:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool

    def __post_init__(self) -> None:
        for name in SHAPE_AXES + ("vocab_size", "max_position_embeddings"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ShapeError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            raise ShapeError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads}): "
                "every query head belongs to one KV group"
            )

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], chain: Shape | None = None) -> Shape:
        """Build a shape from API/CLI JSON; chain-fixed fields default to (and must equal) the chain's. A null field
        counts as absent (the API's optional fields arrive as null)."""
        data = {key: value for key, value in data.items() if value is not None}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ShapeError(f"shape has unknown fields {unknown}; allowed: {sorted(known)}")
        missing = [name for name in SHAPE_AXES if name not in data]
        if missing:
            raise ShapeError(f"shape is missing {missing}")
        values = dict(data)
        for name in CHAIN_FIXED:
            if chain is None:
                if name not in values:
                    raise ShapeError(f"shape is missing {name}")
            elif name not in values:
                values[name] = getattr(chain, name)
            elif values[name] != getattr(chain, name):
                raise ShapeError(
                    f"shape.{name} must equal the chain's ({getattr(chain, name)!r}), got {values[name]!r}"
                )
        return cls(**values)


_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_size(size: int | str) -> int:
    """'138M' -> 138_000_000, '1.2B' -> 1_200_000_000, 100000000 -> 100000000."""
    if isinstance(size, bool):
        raise ShapeError(f"size must be an integer or a string such as '138M', got {size!r}")
    if isinstance(size, int):
        value = size
    else:
        match = _SIZE_RE.match(str(size))
        if not match:
            raise ShapeError(f"size must be an integer or a string such as '138M' or '1.2B', got {size!r}")
        scaled = float(match.group(1)) * _SUFFIX[match.group(2).lower()]
        if not math.isfinite(scaled):  # hundreds of digits: no size, and round() of infinity raises
            raise ShapeError(f"size {size!r} is out of range")
        value = round(scaled)
    if value <= 0:
        raise ShapeError(f"size must be positive, got {size!r}")
    return value


def format_size(params: int) -> str:
    return f"{params / 1e9:.2f}B" if params >= 10**9 else f"{params / 1e6:.2f}M"


class ParamCounter(Protocol):
    hidden_follows_heads: bool  # GPT-2 and GPT-NeoX: hidden_size == num_heads * head_dim
    hidden_divisible_by_heads: bool  # Llama checkpoints as transformers validates them

    def num_params(self, shape: Shape) -> int: ...

    def validate(self, shape: Shape) -> None: ...


def _lerp(a: int, b: int, t: float) -> float:
    return a + t * (b - a)


def _round_to(value: float, multiple: int, a: int, b: int) -> int:
    """Round to a multiple, but give the anchors' own values back exactly at the ends of the range."""
    lo, hi = min(a, b), max(a, b)
    if math.isclose(value, a) or math.isclose(value, b):
        return a if math.isclose(value, a) else b
    rounded = math.floor(value / multiple + 0.5) * multiple
    return min(max(rounded, lo), hi)


def interpolate_shape(arch: ParamCounter, small: Shape, large: Shape, t: float, fine: bool = False) -> Shape:
    """Move every axis from `small` (t=0) toward `large` (t=1): whole layers, whole GQA groups, FFN multiples of 64.

    When the family ties hidden size to heads (GPT-2, GPT-NeoX), the hidden size follows the heads. `fine` halves
    the hidden size's step (for Llama: to the head count), for targets the default steps cannot reach within 3%.
    """
    kv = _round_to(_lerp(small.num_kv_heads, large.num_kv_heads, t), 1, small.num_kv_heads, large.num_kv_heads)
    group = _round_to(_lerp(small.group_size, large.group_size, t), 1, small.group_size, large.group_size)
    heads = kv * group
    if arch.hidden_divisible_by_heads:
        multiple = heads if fine else math.lcm(heads, 8)
    else:
        multiple = HIDDEN_MULTIPLE // 2 if fine else HIDDEN_MULTIPLE
    hidden = _round_to(_lerp(small.hidden_size, large.hidden_size, t), multiple, small.hidden_size, large.hidden_size)
    if arch.hidden_follows_heads:
        hidden = heads * small.head_dim
    return replace(
        small,
        num_layers=_round_to(_lerp(small.num_layers, large.num_layers, t), 1, small.num_layers, large.num_layers),
        hidden_size=hidden,
        num_heads=heads,
        num_kv_heads=kv,
        intermediate_size=_round_to(
            _lerp(small.intermediate_size, large.intermediate_size, t),
            FFN_MULTIPLE,
            small.intermediate_size,
            large.intermediate_size,
        ),
    )


def check_same_chain(small: Shape, large: Shape) -> None:
    for name in CHAIN_FIXED + ("head_dim",):
        if getattr(small, name) != getattr(large, name):
            raise ShapeError(
                f"anchors differ in {name} ({getattr(small, name)!r} vs {getattr(large, name)!r}); "
                "interpolation needs it fixed within a chain"
            )


def solve_shape(arch: ParamCounter, small: Shape, large: Shape, target: int) -> Shape:
    """The deterministic size -> shape rule of the API contract (Sizes): bisection on one fraction t."""
    check_same_chain(small, large)
    p_small, p_large = arch.num_params(small), arch.num_params(large)
    lo_p, hi_p = min(p_small, p_large), max(p_small, p_large)
    if not lo_p * (1 - SIZE_TOLERANCE) <= target <= hi_p * (1 + SIZE_TOLERANCE):
        raise ShapeError(
            f"size {format_size(target)} ({target}) is outside the anchors' range "
            f"[{format_size(lo_p)}, {format_size(hi_p)}] ([{lo_p}, {hi_p}])"
        )
    if p_small > p_large:
        small, large = large, small
    best = _bisect(arch, small, large, target, fine=False)
    if abs(arch.num_params(best) - target) > SIZE_TOLERANCE * target:
        best = _bisect(arch, small, large, target, fine=True)
    arch.validate(best)
    return best


def _bisect(arch: ParamCounter, small: Shape, large: Shape, target: int, fine: bool) -> Shape:
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if arch.num_params(interpolate_shape(arch, small, large, mid, fine)) < target:
            lo = mid
        else:
            hi = mid
    candidates = {interpolate_shape(arch, small, large, t, fine) for t in (lo, hi)}
    # closest count first; ties go to fewer layers, then to the smaller model
    return min(candidates, key=lambda s: (abs(arch.num_params(s) - target), s.num_layers, arch.num_params(s)))


def solve_derived_shape(arch: ParamCounter, anchor: Shape, target: int, order: str = PRUNE_ORDER,
                        ffn_keep: float = FFN_KEEP) -> Shape:
    """The shape of a model cut from one anchor to `target` parameters, width only (depth stays: Minitron finds
    width pruning recovers better than depth).

    uniform: the contract's one-fraction rule between a floor of the same depth (one KV group, FFN 64) and the
    anchor. ffn_first: the FFN alone down to `ffn_keep` of its width, then the one-fraction rule on every width axis
    from there (NVIDIA's pruning guidance and Minitron cut the FFN first and the hidden size last); measured in
    docs/DISTILLATION.md ("The anchor recipe")."""
    if order not in PRUNE_ORDERS:
        raise ShapeError(f"prune_order must be one of {', '.join(PRUNE_ORDERS)}, got {order!r}")
    if target > arch.num_params(anchor) * (1 + SIZE_TOLERANCE):
        raise ShapeError(f"size {format_size(target)} ({target}) is above the anchor's "
                         f"{format_size(arch.num_params(anchor))}; cutting cannot grow a model")
    floor = replace(anchor, num_kv_heads=1, num_heads=anchor.group_size, intermediate_size=FFN_MULTIPLE,
                    hidden_size=anchor.group_size * anchor.head_dim if arch.hidden_follows_heads else FFN_MULTIPLE)
    if order == "uniform":
        return solve_shape(arch, floor, anchor, target)
    kept = max(FFN_MULTIPLE, math.floor(anchor.intermediate_size * ffn_keep / FFN_MULTIPLE) * FFN_MULTIPLE)
    ffn_cut = replace(anchor, intermediate_size=min(kept, anchor.intermediate_size))
    if target >= arch.num_params(ffn_cut) * (1 - SIZE_TOLERANCE):
        return solve_shape(arch, ffn_cut, anchor, target)  # the two ends differ in the FFN only
    return solve_shape(arch, floor, ffn_cut, target)
