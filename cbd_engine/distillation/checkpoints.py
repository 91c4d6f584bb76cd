"""Weights and resumable checkpoints of a distillation run, whole under FSDP too: full (unsharded) state dicts
gathered on the CPU, written by rank 0 through io/atomic.py (a kill leaves the last checkpoint or the one before it
whole), tied weights stored once; and the FSDP2 sharding of the student."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from cbd_engine.io.atomic import atomic_output_dir, old_version
from cbd_engine.nn.distributed import world


def existing(target: Path) -> Path | None:
    """The checkpoint folder a kill left whole: `target`, or the one it was replacing."""
    for candidate in (target, old_version(target)):
        if (candidate / "model.safetensors").is_file() and (candidate / "state.json").is_file():
            return candidate
    return None


# Full (unsharded) state dicts on the CPU. Under FSDP, taking one is a collective (every rank calls it) and setting one
# gives each rank its shard; in one process or under DDP they are the model's own tensors.
FULL_STATE = StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_weights(model: nn.Module, folder: Path, state: dict) -> None:
    """Weights (safetensors) plus a small JSON state, swapped in atomically by rank 0. Every rank calls it (under FSDP
    the weights are gathered first) and it returns when the folder is complete."""
    _save(folder, get_model_state_dict(model, options=FULL_STATE), model, state)


def load_weights(model: nn.Module, folder: Path) -> dict:
    weights = load_file(folder / "model.safetensors")
    set_model_state_dict(model, _with_aliases(weights, model), options=StateDictOptions(full_state_dict=True))
    return json.loads((folder / "state.json").read_text())


def save_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler, state: dict) -> None:
    """A resumable checkpoint, saved as save_weights does. Tensors go to safetensors; the optimizer's full state dict
    (tensors and numbers, keyed by parameter name) and the schedule's to a torch file read back with
    weights_only=True."""
    weights = get_model_state_dict(model, options=FULL_STATE)
    resume_state = {"optimizer": get_optimizer_state_dict(model, optimizer, options=FULL_STATE),
                    "scheduler": scheduler.state_dict()}
    _save(folder, weights, model, state, lambda tmp: torch.save(resume_state, tmp / "optimizer.pt"))


def load_checkpoint(folder: Path, model: nn.Module, optimizer, scheduler) -> dict:
    state = load_weights(model, folder)
    saved = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
    set_optimizer_state_dict(model, optimizer, saved["optimizer"], options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(saved["scheduler"])
    return state


def _save(folder: Path, weights: dict, model: nn.Module, state: dict,
          write_more: Callable[[Path], None] | None = None) -> None:
    if world()[0] == 0:
        with atomic_output_dir(folder, replace=True) as tmp:
            save_file(_without_aliases(weights, model), str(tmp / "model.safetensors"))
            if write_more is not None:
                write_more(tmp)
            (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if dist.is_initialized():
        dist.barrier()


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied parameters: {second name: first name} (a tied output layer's weight is the embedding's)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        if id(parameter) in first:
            aliases[name] = first[id(parameter)]
        else:
            first[id(parameter)] = name
    return aliases


def _without_aliases(weights: dict, model: nn.Module) -> dict:
    aliases = _aliases(model)  # safetensors stores a tensor once: drop the names that only repeat one
    return {name: tensor for name, tensor in weights.items() if name not in aliases}


def _with_aliases(weights: dict, model: nn.Module) -> dict:
    return {**weights, **{name: weights[first] for name, first in _aliases(model).items() if first in weights}}


def shard_fsdp(module: nn.Module) -> nn.Module:
    """FSDP2: each decoder layer is its own shard unit, the rest (embeddings, final norm, output layer) the root's.
    For students that do not fit one device. Checkpoints and the best weights are gathered to full tensors on the
    CPU (save_weights); generation runs under `unsharded_root`."""
    from torch.distributed.fsdp import fully_shard

    for layer in _decoder_layers(module.student):
        fully_shard(layer)
    fully_shard(module)
    return module


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    for candidate in ("layers", "h"):
        base = model.base_model
        if hasattr(base, candidate):
            return list(getattr(base, candidate))
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__} for FSDP")
