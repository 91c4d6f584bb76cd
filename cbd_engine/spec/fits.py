"""Fit a memory budget: the largest model of a chain whose export (a GGUF file of a quantization) plus its KV cache
at a context fits in a number of bytes. Torch-free: the API answers with the shape and the arithmetic at once.

Plan:
1. The candidates are the shapes the size rule moves through between two adjacent anchors (shapes.interpolate_shape
   for t from 0 to 1, its default steps), the anchors themselves included: `path_shapes` walks t and keeps each
   shape once, so between any two anchors there are a few dozen (each axis steps at most (large - small) / step
   times). With `round_to_blocks`, hidden and FFN widths are rounded down to whole quantization blocks (32 weights
   for Q8_0 and Q4_0, 256 for Q6_K and Q4_K), so that no tensor falls back to a wider type; shapes that still would
   (heads x head_dim not whole blocks) are left out.
2. Each candidate's bytes are spec/export.py's `device_bytes`: the file (tensor data by type, header, metadata) and
   the KV cache. The search is monotone in parameters: the answer is the candidate with the most parameters whose
   total is at most the budget, so every larger candidate's total is over it. It is not a bisection on bytes: a
   width that is not a whole number of blocks makes its tensors F16 (1.9 times Q8_0's bytes), so bytes are not
   monotone along t, and a scan of a few dozen shapes per pair of anchors costs milliseconds.
3. A budget below every candidate is an error stating the smallest total (not always the fewest parameters': a
   narrower anchor whose widths are not whole blocks can take more bytes than a wider one); above the largest
   anchor, the answer is the largest anchor, said so (`ceiling`).

K-quants (super-blocks of 256) round only where the head layout allows: the attention output's rows are heads x
head_dim wide, and SmolLM2's 64-wide heads give 192, 384 or 576 at 3, 6 or 9 heads, never a multiple of 256, so
such a chain has no rounded K-quant shape (a 422 says so); without rounding its K-quant files are counted with
llama.cpp's fallbacks (Q4_K to Q5_0, Q6_K to Q8_0), as they are written.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from cbd_engine.spec.export import DeviceBytes, block_size, check_quant, device_bytes
from cbd_engine.spec.families import Architecture
from cbd_engine.spec.shapes import Shape, ShapeError, check_same_chain, interpolate_shape

# decimal units are powers of 1000 (SI, as disk and download sizes are given), binary ones powers of 1024
MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
                "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")
T_RESOLUTION = 1e-9  # t steps closer than this are one step (far below one unit of any axis of a real chain)


class BudgetError(ShapeError):
    """A budget no model of the chain fits; the message states the smallest model's bytes."""


def parse_memory(memory: int | str) -> int:
    """'300MB' -> 300_000_000, '1.5GiB' -> 1_610_612_736, 300000000 -> 300000000 (bytes)."""
    if isinstance(memory, bool):
        raise ShapeError(f"memory must be a number of bytes or a string such as '300MB', got {memory!r}")
    if isinstance(memory, int):
        value = memory
    else:
        match = _MEMORY_RE.match(str(memory))
        unit = match.group(2).lower() if match else None
        if unit not in MEMORY_UNITS:
            raise ShapeError(f"memory must be a number of bytes or a string such as '300MB' or '1.5GiB' (units: "
                             f"{', '.join(u for u in MEMORY_UNITS if u)}), got {memory!r}")
        scaled = float(match.group(1)) * MEMORY_UNITS[unit]
        if not math.isfinite(scaled):
            raise ShapeError(f"memory {memory!r} is out of range")
        value = math.floor(scaled)
    if value <= 0:
        raise ShapeError(f"memory must be positive, got {memory!r}")
    return value


@dataclass(frozen=True)
class Budget:
    memory: int  # bytes
    fmt: str
    quant: str
    context: int  # tokens the KV cache holds
    round_to_blocks: bool = False

    def __post_init__(self) -> None:
        check_quant(self.fmt, self.quant)
        if self.fmt != "gguf":
            raise ShapeError(f"fits counts the bytes of gguf files only, not {self.fmt}: its export's memory is "
                             "not counted yet")
        if self.context < 1:
            raise ShapeError(f"context must be a positive number of tokens, got {self.context}")

    @property
    def block(self) -> int:
        """The width every row is rounded to with round_to_blocks (F16 has no blocks)."""
        return block_size(self.quant) if self.round_to_blocks else 1


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    params: int
    pair: int  # index of the pair of adjacent anchors it lies between (0: the two largest)
    bytes: DeviceBytes


@dataclass(frozen=True)
class Fit:
    """The chosen shape, its bytes, and the next larger candidate's (None at the chain's largest model)."""

    chosen: Candidate
    next_larger: Candidate | None
    ceiling: bool  # the chosen is the chain's largest candidate: the budget may hold more than any of its models

    def note(self, budget: Budget) -> str | None:
        if not self.ceiling:
            return None
        largest = "the largest anchor" if budget.block == 1 else "its largest shape of whole blocks"
        return (f"the budget ({budget.memory} bytes) holds the chain's largest model ({self.chosen.bytes.total} "
                f"bytes): this is {largest}; the chain makes nothing larger")


def arithmetic(fit: Fit, budget: Budget) -> dict:
    """The fit as the API and the CLI state it: the budget, the chosen shape's terms, the next larger's total."""
    chosen, larger, counted = fit.chosen, fit.next_larger, fit.chosen.bytes
    return {"memory": budget.memory, "format": budget.fmt, "quant": budget.quant, "context": budget.context,
            "round_to_blocks": budget.round_to_blocks, "params": chosen.params, "weights_bytes": counted.weights,
            "weights_by_type": counted.by_type, "fallback_params": counted.fallback(budget.quant),
            "overhead_bytes": counted.overhead, "file_bytes": counted.file, "kv_cache_bytes": counted.kv_cache,
            "total_bytes": counted.total, "note": fit.note(budget),
            "next_larger": {"params": larger.params, "shape": larger.shape.to_dict(),
                            "total_bytes": larger.bytes.total} if larger else None}


def _rounded(arch: Architecture, shape: Shape, small: Shape, large: Shape, block: int) -> Shape | None:
    """The shape with hidden and FFN widths rounded down to whole blocks (up, when down leaves the anchors' range);
    None when no such width lies in the range."""
    if block == 1:
        return shape
    hidden_step = math.lcm(block, shape.num_heads) if arch.hidden_divisible_by_heads else block
    widths = {}
    for axis, step in (("hidden_size", hidden_step), ("intermediate_size", block)):
        if axis == "hidden_size" and arch.hidden_follows_heads:
            continue  # heads x head_dim: whole blocks or not, it cannot move alone
        lo, hi = sorted((getattr(small, axis), getattr(large, axis)))
        down = getattr(shape, axis) // step * step
        width = down if down >= lo else down + step
        if width > hi or width < 1:
            return None
        widths[axis] = width
    return replace(shape, **widths)


def path_shapes(arch: Architecture, small: Shape, large: Shape, block: int = 1) -> list[Shape]:
    """The distinct shapes the size rule moves through from `small` to `large` (t from 0 to 1), in order of
    parameters; widths rounded to whole blocks of `block` weights (1: as the rule makes them)."""
    check_same_chain(small, large)

    def at(t: float) -> Shape | None:
        return _rounded(arch, interpolate_shape(arch, small, large, t), small, large, block)

    # every axis moves monotonically in t: an interval whose ends agree holds no other shape
    found, stack = {}, [(0.0, at(0.0), 1.0, at(1.0))]
    while stack:
        lo, lo_shape, hi, hi_shape = stack.pop()
        found[lo] = lo_shape
        found[hi] = hi_shape
        if lo_shape != hi_shape and hi - lo > T_RESOLUTION:
            mid = (lo + hi) / 2
            mid_shape = at(mid)
            stack += [(lo, lo_shape, mid, mid_shape), (mid, mid_shape, hi, hi_shape)]
    shapes = {shape for shape in found.values() if shape is not None}
    return sorted(shapes, key=lambda s: (arch.num_params(s), s.num_layers))


def candidates(arch: Architecture, anchors: Sequence[Shape], budget: Budget, tokenizer_bytes: int) -> list[Candidate]:
    """Every candidate of a chain of `anchors` (largest first), in order of parameters; with round_to_blocks, none
    with a tensor that falls back to F16."""
    found: dict[Shape, Candidate] = {}
    for pair in range(len(anchors) - 1):
        for shape in path_shapes(arch, anchors[pair + 1], anchors[pair], budget.block):
            if shape in found:  # an anchor between two pairs: counted once, in the larger pair
                continue
            counted = device_bytes(arch, shape, budget.fmt, budget.quant, budget.context, tokenizer_bytes)
            if budget.block > 1 and counted.fallback(budget.quant):
                continue
            arch.validate(shape)
            found[shape] = Candidate(shape, arch.num_params(shape), pair, counted)
    return sorted(found.values(), key=lambda c: (c.params, c.shape.num_layers))


def fit_budget(arch: Architecture, anchors: Sequence[Shape], budget: Budget, tokenizer_bytes: int) -> Fit:
    """The largest candidate (by parameters) whose file and KV cache fit `budget.memory`; `anchors` largest first,
    `tokenizer_bytes` as spec/export.py's `gguf_tokenizer_bytes` counts the chain's tokenizer."""
    if len(anchors) < 2:
        raise ShapeError("fitting a budget needs a chain of at least two anchors")
    if budget.context > anchors[0].max_position_embeddings:
        raise ShapeError(f"context {budget.context} is more than the chain's {anchors[0].max_position_embeddings} "
                         "positions")
    ordered = candidates(arch, anchors, budget, tokenizer_bytes)
    if not ordered:
        raise ShapeError(f"no shape between the anchors has hidden and FFN widths of whole {budget.block}-weight "
                         "blocks with every tensor of its type; request it without round_to_blocks")
    fitting = [i for i, c in enumerate(ordered) if c.bytes.total <= budget.memory]
    if not fitting:  # the fewest bytes, not the fewest parameters: a narrower width may fall back to F16
        smallest = min(ordered, key=lambda c: c.bytes.total)
        raise BudgetError(
            f"memory {budget.memory} bytes is below the chain's smallest model: {smallest.params} parameters take "
            f"{smallest.bytes.total} bytes as {budget.quant} {budget.fmt} with a {budget.context}-token KV cache "
            f"(file {smallest.bytes.file}, KV cache {smallest.bytes.kv_cache})")
    best = fitting[-1]
    following = ordered[best + 1] if best + 1 < len(ordered) else None
    return Fit(ordered[best], following, ceiling=following is None)
