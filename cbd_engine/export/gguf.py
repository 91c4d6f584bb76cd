"""A model folder -> one GGUF file that llama.cpp (and ollama, LM Studio) loads: the engine's own writer.

Why our own and not llama.cpp's `convert_hf_to_gguf.py`: CBD makes shapes that converter gets wrong (its GPT-2 path
assumes an FFN of 4 x hidden, so llama.cpp refuses the file), and it is a script of the llama.cpp repository, not a
package. The writing itself is the `gguf` package's (GGUFWriter, its HF -> GGUF tensor-name maps, SpecialVocab for
merges, special ids and the chat template; the quantization is llama.cpp's own, `export.llamacpp.quantize`); this
module only says, per family, which llama.cpp architecture a model is, which hyperparameters it needs, and how a
tensor's layout differs:

- Llama (and Mistral): llama.cpp applies rotary embeddings to interleaved pairs, transformers to the two halves of
  each head, so q_proj and k_proj rows are permuted per head (`_rotary_pairs`), as llama.cpp's converter does.
  Qwen2/Qwen3 use the halves layout in llama.cpp too (no permutation); Qwen3 adds its q/k norms.
- GPT-2: Conv1D weights are [in, out]; GGUF wants [out, in].
- GPT-NeoX: query_key_value is fused per head ([h0 q k v | h1 q k v ...]); llama.cpp wants [q | k | v].

Tensor types come from cbd_engine.spec.export (one table for the file and for the `fits` arithmetic).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbd_engine.export.llamacpp import quantize
from cbd_engine.io.atomic import atomic_output_file
from cbd_engine.io.checkpoint import SafetensorsReader
from cbd_engine.spec.export import (
    CONV1D_SUFFIXES,
    GGUF_QUANTS,
    check_gguf_tokenizer,
    gguf_tensor_type,
    gguf_tokens,
    is_vocabulary,
    tokenizer_vocab,
)
from cbd_engine.spec.families import ModelSpec, read_config

# Q4_K: llama.cpp calls a file of Q4_K tensors with a Q6_K vocabulary Q4_K_S (its Q4_K_S also widens a few
# attention tensors; the file type is a label, the tensors carry their own types)
FILE_TYPES = {"F16": "MOSTLY_F16", "Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K", "Q4_K": "MOSTLY_Q4_K_S",
              "Q4_0": "MOSTLY_Q4_0"}
# llama.cpp's pre-tokenizer names for the byte-level BPE pre-tokenizers of tokenizer.json (llama.cpp tells them apart
# by hashing the tokenization of a test text; the structure says the same for the tokenizers CBD's families use)
PRE_TOKENIZERS = {
    ("ByteLevel",): "gpt-2",
    ("Digits", "ByteLevel"): "smollm",  # SmolLM/SmolLM2: digits one by one, then GPT-2's byte-level regex
}


class GGUFExportError(ValueError):
    """A model this writer cannot express as GGUF (the message says what and why)."""


@dataclass(frozen=True)
class Layout:
    """How one family's model becomes a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    hparams: Callable[[ModelSpec], dict[str, object]]  # GGUFWriter add_* method suffix -> value
    transform: Callable[[str, np.ndarray, ModelSpec], np.ndarray]  # (HF name, tensor) -> the GGUF layout


def _rope_theta(spec: ModelSpec, default: float) -> float:
    config = spec.config
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", None):
        raise GGUFExportError(f"rope scaling {kind!r} is not written to GGUF by this exporter (only plain RoPE)")
    return float(rope.get("rope_theta", config.get("rope_theta", default)))


def _llama_hparams(spec: ModelSpec) -> dict[str, object]:
    s = spec.shape
    return {"context_length": s.max_position_embeddings, "embedding_length": s.hidden_size,
            "block_count": s.num_layers, "feed_forward_length": s.intermediate_size, "head_count": s.num_heads,
            "head_count_kv": s.num_kv_heads, "key_length": s.head_dim, "value_length": s.head_dim,
            "rope_dimension_count": s.head_dim, "rope_freq_base": _rope_theta(spec, 10000.0),
            "layer_norm_rms_eps": spec.eps, "vocab_size": s.vocab_size}


def _gpt2_hparams(spec: ModelSpec) -> dict[str, object]:
    s = spec.shape
    return {"context_length": s.max_position_embeddings, "embedding_length": s.hidden_size,
            "block_count": s.num_layers, "feed_forward_length": s.intermediate_size, "head_count": s.num_heads,
            "layer_norm_eps": spec.eps, "vocab_size": s.vocab_size}


def _neox_hparams(spec: ModelSpec) -> dict[str, object]:
    s, config = spec.shape, spec.config
    rotary = config.get("rotary_pct", (config.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    return {**_gpt2_hparams(spec), "rope_dimension_count": int(rotary * s.head_dim),
            "rope_freq_base": float(config.get("rotary_emb_base", (config.get("rope_parameters") or {})
                                               .get("rope_theta", 10000.0))),
            "parallel_residual": bool(config.get("use_parallel_residual", True))}


def _rotary_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' rotary halves -> llama.cpp's interleaved pairs, per head (rows; a bias is one column)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_transform(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return _rotary_pairs(w, spec.shape.num_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return _rotary_pairs(w, spec.shape.num_kv_heads)
    return w


def _same(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return w


def _gpt2_transform(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    return np.ascontiguousarray(w.T) if name.endswith(CONV1D_SUFFIXES) else w


def _neox_transform(name: str, w: np.ndarray, spec: ModelSpec) -> np.ndarray:
    if "query_key_value" not in name:
        return w
    heads = spec.shape.num_heads
    per_head = w.reshape(heads, 3, -1, *w.shape[1:])  # [head, q|k|v, head_dim, (hidden)]
    return np.ascontiguousarray(per_head.swapaxes(0, 1)).reshape(w.shape)


LAYOUTS = {
    "llama": Layout("LLAMA", _llama_hparams, _llama_transform),
    "mistral": Layout("LLAMA", _llama_hparams, _llama_transform),
    "qwen2": Layout("QWEN2", _llama_hparams, _same),
    "qwen3": Layout("QWEN3", _llama_hparams, _same),
    "gpt2": Layout("GPT2", _gpt2_hparams, _gpt2_transform),
    "gpt_neox": Layout("GPTNEOX", _neox_hparams, _neox_transform),
}


def layout_of(spec: ModelSpec) -> Layout:
    model_type = spec.config.get("model_type")
    if model_type not in LAYOUTS:
        raise GGUFExportError(f"model_type {model_type!r} has no GGUF layout; supported: {', '.join(LAYOUTS)}")
    return LAYOUTS[model_type]


# --- the tokenizer ----------------------------------------------------------------------------------------------


def _pre_tokenizer(tokenizer: dict) -> str:
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = tuple(step.get("type") for step in steps)
    if key not in PRE_TOKENIZERS:
        raise GGUFExportError(f"the tokenizer's pre-tokenizer {key} has no llama.cpp name here; known: "
                              f"{sorted(PRE_TOKENIZERS)}")
    return PRE_TOKENIZERS[key]


def add_tokenizer(writer, folder: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer.json as llama.cpp's "gpt2" tokenizer: every token with its type (special added
    tokens are CONTROL, so the chat template's markers are parsed as one token), padded to the model's vocabulary
    with unused entries; merges, special ids, add-BOS flags and the chat template through gguf's SpecialVocab."""
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{folder} has no tokenizer.json: a GGUF file carries its tokenizer")
    tokenizer = json.loads(path.read_text())
    try:
        check_gguf_tokenizer(tokenizer)
    except ValueError as error:
        raise GGUFExportError(str(error)) from None
    vocab = tokenizer_vocab(tokenizer)
    if max(vocab.values()) >= vocab_size:
        raise GGUFExportError(f"the tokenizer has ids up to {max(vocab.values())}, the model {vocab_size} rows")
    special = {t["id"] for t in tokenizer.get("added_tokens", []) if t.get("special")}
    added = {t["id"] for t in tokenizer.get("added_tokens", [])}
    tokens = gguf_tokens(vocab, vocab_size)
    types = [gguf.TokenType.UNUSED] * vocab_size
    for index in vocab.values():
        types[index] = (gguf.TokenType.CONTROL if index in special else
                        gguf.TokenType.USER_DEFINED if index in added else gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    gguf.SpecialVocab(folder, load_merges=True, n_vocab=vocab_size).add_to_gguf(writer, quiet=True)


# --- the file ---------------------------------------------------------------------------------------------------


def _encode(name: str, w: np.ndarray, quant: str, vocabulary: bool) -> tuple[np.ndarray, object]:
    """(data, GGMLQuantizationType) of one tensor in a file of `quant`."""
    import gguf

    kind = gguf_tensor_type(quant, w.shape, vocabulary)
    if kind == "F32":
        return w.astype(np.float32), gguf.GGMLQuantizationType.F32
    if kind == "F16":
        return w.astype(np.float16), gguf.GGMLQuantizationType.F16
    return quantize(w, kind), gguf.GGMLQuantizationType[kind]


def write_gguf(folder: str | Path, out: str | Path, quant: str = "Q8_0", name: str | None = None,
               metadata: dict[str, str] | None = None) -> Path:
    """Write the model folder `folder` as one GGUF file at `out` (atomically), its tensors in `quant`."""
    import gguf

    if quant not in GGUF_QUANTS:
        raise GGUFExportError(f"quant must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    folder, out = Path(folder), Path(out)
    spec = ModelSpec.from_config(read_config(folder))
    layout = layout_of(spec)
    arch = gguf.MODEL_ARCH[layout.arch]
    names = gguf.get_tensor_name_map(arch, spec.shape.num_layers)
    with atomic_output_file(out) as tmp:
        _write(gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch]), folder, spec, layout, names, quant,
               name or folder.name, metadata or {})
    return out


def _write(writer, folder: Path, spec: ModelSpec, layout: Layout, names, quant: str, name: str,
           metadata: dict[str, str]) -> None:
    import gguf

    writer.add_name(name)
    writer.add_type("model")
    for key, value in metadata.items():
        writer.add_string(key, value)
    for key, value in layout.hparams(spec).items():
        getattr(writer, f"add_{key}")(value)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[quant]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(writer, folder, spec.shape.vocab_size)
    with SafetensorsReader(folder) as reader:
        for hf_name, tensor_spec, _ in spec.architecture.tensor_names(spec.shape):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise GGUFExportError(f"tensor {hf_name} has no {layout.arch} name in the gguf package's map")
            w = layout.transform(hf_name, reader.read(hf_name).float().numpy(), spec)
            data, qtype = _encode(hf_name, w, quant, is_vocabulary(tensor_spec))
            writer.add_tensor(gguf_name, data, raw_dtype=qtype)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
