"""Loading models and tokenizers, and the two pieces of a causal LM the losses use apart: the final hidden states
and the output layer."""

from __future__ import annotations

from pathlib import Path

import torch


def load_model(path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def has_tokenizer(path: str | Path) -> bool:
    """Whether the folder carries a tokenizer (what scoring on text needs; a checkpoint may ship weights only)."""
    return any((Path(path) / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json"))


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
