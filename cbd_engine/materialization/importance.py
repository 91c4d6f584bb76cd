"""Which units matter: activation-based importance on calibration text (Minitron-style), or weight magnitude by name.

* residual channels: mean |x| of each channel of every layer's input, each token normalized by its RMS first (the
  few massive-activation channels would otherwise decide alone);
* layers: block influence, 1 - cos(x_in, x_out) of each layer's input and output (ShortGPT);
* heads: mean L2 norm of each head's output, the input of the attention output projection;
* FFN neurons: mean |activation|, the input of the MLP down projection.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from cbd_engine.io.cache import cached_json
from cbd_engine.io.checkpoint import SafetensorsReader, folder_hashes
from cbd_engine.materialization.stream import single_thread
from cbd_engine.spec.families import FFN, GAIN, HEADS, RESIDUAL, SHIFT, ModelSpec, read_config, unit_rows
from cbd_engine.spec.progress import ProgressCallback, ProgressEvent, StageTimer, no_progress


@dataclass
class Importance:
    kind: str  # "activation" or "magnitude"
    residual: list[float] | None  # None (here and below): not measured, magnitude_importance measures what is cut
    layers: list[float] | None  # None: no evidence, shrink depth evenly
    heads: list[list[float]] | None  # per layer, per query head
    ffn: list[list[float]] | None  # per layer, per neuron


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over batch and sequence of values [B, T, ...] where mask [B, T] is 1."""
    weights = mask.to(values.dtype).reshape(*mask.shape, *([1] * (values.ndim - 2)))
    return (values * weights).sum(dim=(0, 1)) / weights.sum().clamp(min=1)


def _first_tensor(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def activation_importance(model_dir: str | Path, texts: list[str], max_length: int = 256,
                          batch_size: int = 8, progress: ProgressCallback = no_progress) -> Importance:
    """Run the model over calibration texts once and collect every unit's importance through hooks. (One function
    over 60 lines on purpose: the four hooks close over the same running sums and attention mask.)"""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not texts:
        raise ValueError("calibration needs at least one text")
    spec = ModelSpec.from_config(read_config(model_dir))
    arch, shape = spec.architecture, spec.shape
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    layers = shape.num_layers
    sums = {
        "residual": torch.zeros(shape.hidden_size),
        "layers": torch.zeros(layers),
        "heads": torch.zeros(layers, shape.num_heads),
        "ffn": torch.zeros(layers, shape.intermediate_size),
    }
    state: dict[str, torch.Tensor] = {}
    handles = []

    def layer_pre(i: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["hidden_states"]
            state[f"in{i}"] = x
            normed = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
            sums["residual"].add_(_masked_mean(normed.abs(), state["mask"]))
        return hook

    def layer_post(i: int):
        def hook(module, args, kwargs, output):
            x_in, x_out = state.pop(f"in{i}"), _first_tensor(output)
            cosine = torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1)
            sums["layers"][i] += _masked_mean((1 - cosine)[..., None], state["mask"])[0]
        return hook

    def attn_pre(i: int):
        def hook(module, args):
            x = args[0]
            per_head = x.reshape(*x.shape[:-1], shape.num_heads, -1).norm(dim=-1)
            sums["heads"][i].add_(_masked_mean(per_head, state["mask"]))
        return hook

    def ffn_pre(i: int):
        def hook(module, args):
            sums["ffn"][i].add_(_masked_mean(args[0].abs(), state["mask"]))
        return hook

    for i in range(layers):
        block = model.get_submodule(f"{arch.layers_module}.{i}")
        handles.append(block.register_forward_pre_hook(layer_pre(i), with_kwargs=True))
        handles.append(block.register_forward_hook(layer_post(i), with_kwargs=True))
        handles.append(model.get_submodule(arch.attn_out_module.format(layer=i)).register_forward_pre_hook(attn_pre(i)))
        handles.append(model.get_submodule(arch.ffn_out_module.format(layer=i)).register_forward_pre_hook(ffn_pre(i)))
    timer = StageTimer("importance", math.ceil(len(texts) / batch_size), progress)
    timer.update(0)
    try:
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True,
                              max_length=min(max_length, shape.max_position_embeddings))  # GPT-2: learned positions
            state["mask"] = batch["attention_mask"]
            model(**batch, use_cache=False)
            timer.update(start // batch_size + 1)
    finally:
        for handle in handles:
            handle.remove()
    return Importance(
        kind="activation",
        residual=sums["residual"].tolist(),
        layers=sums["layers"].tolist(),
        heads=sums["heads"].tolist(),
        ffn=sums["ffn"].tolist(),
    )


BLOCK_BYTES = 64 << 20  # float32 bytes of a tensor slice in memory at once (magnitude importance)
THREADS = 2  # magnitude importance: tensors summed at once, each on one torch thread (this project's CPU has 2 cores)
KINDS = (RESIDUAL, HEADS, FFN)  # the axes magnitude importance can rank


class Squares:
    """Squares of a tensor's values in float32, computed in a buffer reused from one block to the next. Memory first
    touched costs a page fault per 4 KiB: on this project's 2-core VM (loaded), converting a 6144 x 2048 bfloat16
    matrix to float32 took 94 ms into new memory and 9 ms into a reused buffer. Read-only use of the input, so a
    memory-mapped tensor is never copied page by page."""

    def __init__(self) -> None:
        self._buffer = torch.empty(0)

    def __call__(self, block: torch.Tensor) -> torch.Tensor:
        """block.float() ** 2; valid until the next call."""
        if self._buffer.numel() < block.numel():
            self._buffer = torch.empty(block.numel())
        return self._buffer[: block.numel()].view(block.shape).copy_(block).pow_(2)


def squared_sums(reader: SafetensorsReader, name: str, dims: list[int], squares: Squares | None = None
                 ) -> dict[int, torch.Tensor]:
    """For each of `dims`, the sum of squares over every other dimension of the tensor, read a slice of rows at a
    time: the largest tensor (Qwen3-1.7B's 151936 x 2048 embedding: 1.2 GB in float32) never exists whole."""
    squares = squares or Squares()
    shape = reader.info(name).shape
    per_row = math.prod(shape[1:])
    step = max(1, BLOCK_BYTES // (4 * per_row)) if shape else 1
    sums: dict[int, list[torch.Tensor]] = {dim: [] for dim in dims}
    for start in range(0, shape[0] if shape else 1, step):
        rows = (start, min(start + step, shape[0])) if shape else None
        block = squares(reader.read(name, rows))
        for dim in dims:
            others = [d for d in range(block.ndim) if d != dim]
            sums[dim].append(block.sum(dim=others) if others else block.clone())  # sum(dim=[]) would reduce all
    return {dim: torch.cat(parts) if dim == 0 else torch.stack(parts).sum(0) for dim, parts in sums.items()}


def magnitude_importance(model_dir: str | Path, spec: ModelSpec, kinds: tuple[str, ...] = KINDS) -> Importance:
    """Squared norms of each unit's weight slices, summed over every tensor that has the unit's axis (no data).

    Only the axes of `kinds` are measured (the others are None), so only the tensors with one of them are read:
    cutting Qwen3-1.7B's FFN reads its MLPs, 61% of the weights. Tensors are read and squared by THREADS threads
    at once, each into buffers of its own, and summed into the totals in checkpoint order (the same float sums as
    one thread: measured bitwise equal)."""
    shape, arch = spec.shape, spec.architecture
    totals = {RESIDUAL: torch.zeros(shape.hidden_size), HEADS: torch.zeros(shape.num_layers, shape.num_heads),
              FFN: torch.zeros(shape.num_layers, shape.intermediate_size)}
    jobs = []
    for name, tensor_spec, layer in arch.tensor_names(shape):
        axes = {dim: axes[0] for dim, axes in enumerate(tensor_spec.dims) if len(axes) == 1
                and axes[0].role not in (GAIN, SHIFT) and axes[0].kind in kinds}
        if axes:
            jobs.append((name, layer, axes))
    buffers = threading.local()

    def sums(job: tuple[str, int | None, dict]) -> dict[int, torch.Tensor]:
        if not hasattr(buffers, "squares"):
            buffers.squares = Squares()
        return squared_sums(reader, job[0], list(job[2]), buffers.squares)

    with SafetensorsReader(model_dir) as reader, single_thread(), ThreadPoolExecutor(THREADS) as pool:
        for (_, layer, axes), per_dim in zip(jobs, pool.map(sums, jobs), strict=True):
            for dim, per_row in per_dim.items():
                per_unit = per_row.reshape(-1, unit_rows(shape, axes[dim])).sum(-1)
                target = totals[axes[dim].kind]
                if axes[dim].kind == RESIDUAL:
                    target += per_unit
                else:
                    target[layer] += per_unit

    def measured(kind: str) -> list | None:
        return totals[kind].tolist() if kind in kinds else None

    return Importance("magnitude", measured(RESIDUAL), None, measured(HEADS), measured(FFN))


IMPORTANCE_VERSION = 1  # bump when the measures change, so cached values are not reused


def cached_activation_importance(model_dir: str | Path, texts: list[str], cache_dir: Path,
                                 progress: ProgressCallback = no_progress) -> Importance:
    """activation_importance, remembered per (weights' sha256, calibration texts) in `cache_dir`: a chain's anchors
    are materialized from many times with the same calibration set, and the forward pass is most of the cost."""
    key = [IMPORTANCE_VERSION, folder_hashes(model_dir), texts]
    computed = []

    def compute() -> dict:
        computed.append(True)
        return asdict(activation_importance(model_dir, texts, progress=progress))

    result = Importance(**cached_json(cache_dir, "importance", key, compute))
    if not computed:  # a cache hit still shows the stage, done, to whoever watches the job
        progress(ProgressEvent("importance", 1, 1))
    return result
