"""Devices by the API's names (spec/options.py DEVICES) and the precision each runs at."""

from __future__ import annotations

import torch

from cbd_engine.spec.options import DEVICES


def npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device with torch)
    except ImportError:
        return False
    return bool(torch.npu.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """The API's device names: auto (CUDA, then Ascend, then CPU), cpu, gpu (CUDA), npu (Ascend via torch_npu)."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "gpu" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("device 'gpu' requested but CUDA is not available")
        return torch.device("cuda", torch.cuda.current_device())
    if name == "npu" or (name == "auto" and npu_available()):
        if not npu_available():
            raise ValueError("device 'npu' requested but torch_npu is not installed or sees no NPU")
        return torch.device("npu", torch.npu.current_device())
    return torch.device("cpu")


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on accelerators; a no-op context on CPU unless asked for."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)
