"""Process-group helpers shared by the training loops: rank and world size, joining torchrun's group, summing
numbers over ranks, and gathering an FSDP root's weights for generation."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> None:
    """Join the process group torchrun describes (gloo on CPU, nccl on CUDA, hccl on Ascend)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = {"cuda": "nccl", "npu": "hccl"}.get(device.type, "gloo")
        dist.init_process_group(backend)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if world()[1] == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def over_ranks(value: float, device: torch.device, op: str = "max") -> float:
    """The max (or, with op "min", the min) of `value` over all ranks (a collective: every rank calls it)."""
    if world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.MIN)
    return float(tensor.item())


@contextlib.contextmanager
def unsharded_root(module: nn.Module) -> Iterator[None]:
    """Generation calls the model outside the FSDP wrapper's forward, where the root's own weights (embeddings,
    final norm, output layer) stay sharded: gather them for its duration (each decoder layer gathers its own in its
    forward). Nothing to do without FSDP."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(module, FSDPModule):
        yield
        return
    module.unshard()
    try:
        yield
    finally:
        module.reshard()
