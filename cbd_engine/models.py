"""Loading models and tokenizers, picking devices, and the response-token loss used for validation everywhere."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from cbd_engine.batches import Example, collate, encode_rows, next_token_targets, pad_id_of, response_positions
from cbd_engine.data import InstructionRow, read_instruction_rows, split_rows
from cbd_engine.losses import CHUNK_ELEMENTS
from cbd_engine.progress import ProgressCallback, StageTimer, no_progress

DEVICES = ("auto", "cpu", "gpu", "npu")


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


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def hidden_states(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states [batch, seq, hidden] (after the last norm), without the output layer: the losses apply
    the output layer chunk by chunk."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def compile_decoders(*models, backend: str = "inductor") -> None:
    """torch.compile each model's decoder stack (embeddings, layers, final norm) in place: the state dict keeps its
    keys, so checkpoints and save_pretrained are unchanged. The output layers stay eager: the losses apply them
    chunk by chunk with varying chunk lengths. (A teacher cache is not a module and is left as it is.)"""
    for model in models:
        if isinstance(model, torch.nn.Module):
            model.base_model.compile(backend=backend)


def output_head(model) -> torch.nn.Module:
    return model.get_output_embeddings()


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast on accelerators; a no-op context on CPU unless asked for."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


@torch.no_grad()
def example_losses(model, examples: list[Example], pad_id: int, batch_size: int = 8, bf16: bool = False,
                   on_batch: Callable[[int], None] | None = None) -> list[tuple[float, int]]:
    """(cross-entropy sum, scored tokens) of each example, in the order given: the per-row numbers that paired
    comparisons of two models need (cbd_engine.evaluation.stats.paired_difference). `on_batch(rows done)`."""
    if not examples:
        raise ValueError("no examples to score")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    head = output_head(model)
    chunk = max(1, CHUNK_ELEMENTS // int(head.weight.shape[0]))  # positions whose logits exist at once
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))  # similar lengths together: less padding
    for start in range(0, len(order), batch_size):
        members = order[start : start + batch_size]
        batch = collate([examples[i] for i in members], pad_id).to(device)
        scored = response_positions(batch.labels)
        with autocast_for(device, bf16):
            hidden = hidden_states(model, batch.input_ids, batch.attention_mask)[scored]
        targets, rows = next_token_targets(batch.labels)[scored], scored.nonzero()[:, 0]
        sums = torch.zeros(len(members), dtype=torch.float64, device=device)
        for first in range(0, hidden.shape[0], chunk):
            logits = head(hidden[first : first + chunk]).float()
            token_ce = torch.nn.functional.cross_entropy(logits, targets[first : first + chunk], reduction="none")
            sums.index_add_(0, rows[first : first + chunk], token_ce.double())
        for member, total, count in zip(members, sums.tolist(), scored.sum(1).tolist(), strict=True):
            results[member] = (total, int(count))
        if on_batch is not None:
            on_batch(start + len(members))
    model.train(was_training)
    return results


def examples_loss(model, examples: list[Example], pad_id: int, batch_size: int = 8, bf16: bool = False,
                  on_batch: Callable[[int], None] | None = None) -> float:
    """Mean cross-entropy per scored token over `examples` (one mean over all tokens, not a mean of row means)."""
    losses = example_losses(model, examples, pad_id, batch_size, bf16, on_batch)
    return sum(total for total, _ in losses) / max(sum(count for _, count in losses), 1)


def response_loss(model, tokenizer, rows: list[InstructionRow], max_length: int = 512, batch_size: int = 8,
                  prompt_format: str = "alpaca", progress: ProgressCallback = no_progress) -> float:
    """Mean per-token cross-entropy of `model` on the response tokens (and closing EOS) of `rows`; prompt and
    padding are not scored. The validation loss of chains, of the service's new models, and of evaluation."""
    examples = encode_rows(tokenizer, rows, prompt_format, max_length)
    timer = StageTimer("validation", len(examples), progress)
    timer.update(0)
    return examples_loss(model, examples, pad_id_of(tokenizer), batch_size, on_batch=timer.update)


def validation_loss(model_dir: str | Path, data_path: str | Path, max_rows: int | None = 200, max_length: int = 512,
                    batch_size: int = 8, prompt_format: str = "alpaca", device: str = "cpu",
                    progress: ProgressCallback = no_progress) -> float:
    """response_loss of a model folder on the contract's validation rows of an instruction JSONL file."""
    valid = split_rows(read_instruction_rows(data_path)).validation
    if not valid:
        raise ValueError(f"{data_path} has no validation rows (sha256 of instruction + input is 0 mod 10)")
    model = load_model(model_dir, resolve_device(device))
    return response_loss(model, load_tokenizer(model_dir), valid[:max_rows], max_length, batch_size, prompt_format,
                         progress)
