"""GGUF -> Hugging Face safetensors folder, through transformers' own GGUF loader (needs `gguf`)."""

from __future__ import annotations

from pathlib import Path

from cbd_engine.io.atomic import atomic_output_dir


def import_gguf(gguf_file: str | Path, out: str | Path) -> Path:
    """Dequantize a GGUF checkpoint to float32 safetensors, with its tokenizer; written atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf_file}")
    folder, name = str(gguf_file.parent), gguf_file.name
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # the weights are dequantized already; without this transformers refuses to save a "quantized" model
    model.hf_quantizer = None
    for key in ("quantization_config", "_name_or_path"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return Path(out)
