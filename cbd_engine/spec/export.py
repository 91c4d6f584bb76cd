"""What an export is, checked and sized without torch: formats, quantization types, the families each format
takes, where an export lies in its sibling repository, and the bytes a model takes on the device (its GGUF file plus
its KV cache at a context).

One table of GGUF tensor types serves the writer (cbd_engine/export/gguf.py, which asks `gguf_tensor_type` for each
tensor it writes) and the `fits` arithmetic (`device_bytes`), so the size the API promises is the file's size.

A GGUF file (the `gguf` package's GGUFWriter, version 3): a 24-byte header, the metadata (key, type, value), the
tensor index (name, dims, type, offset per tensor), then each tensor's data; the index and every tensor's data start
at a multiple of 32 bytes. The tensor data is counted exactly, and so is the metadata's bulk: the tokenizer's token
list, token types and merges (SmolLM2: 1.77 of its 1.79 MB of header), from the same tokenizer.json the writer
reads. The rest of the metadata (hyperparameters, names, special ids, the chat template) is counted as an allowance
(OTHER_METADATA), and each tensor's name at the longest llama.cpp accepts: so the count is an upper bound of the file,
by at most a few tens of KB.

GGUF type of each tensor (the rules of llama.cpp's own converter and quantizer, `llama_tensor_get_type`):
- 1-D tensors (norm gains and shifts, biases): F32, whatever the quant (llama.cpp reads them as F32).
- 2-D tensors at F16: F16.
- Q8_0 and Q4_0 quantize each row in blocks of 32 weights (34 and 18 bytes a block: a float16 scale and 32 int8 or
  32 int4 values); Q6_K and Q4_K in super-blocks of 256 (210 and 144 bytes: 6.56 and 4.5 bits a weight).
- The vocabulary (token embedding and output head) is kept wider at 4 bits, as llama.cpp's quantizer does (4-bit
  vocabulary rows cost most quality per byte): Q8_0 in Q4_0 files, Q6_K in Q4_K files.
- A tensor whose rows are not whole blocks falls back as llama.cpp's quantizer does: Q4_K to Q5_0, Q6_K to Q8_0,
  and anything not whole 32-weight blocks to F16. SmolLM2's hidden size 576 is 2.25 super-blocks, so its K-quant
  files hold Q5_0/Q8_0 for every tensor read along the hidden axis; `device_bytes` counts exactly that.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cbd_engine.spec.families import VOCAB, Architecture, TensorSpec
from cbd_engine.spec.shapes import Shape

EXPORT_FORMATS = ("gguf", "onnx")
GGUF_QUANTS = ("F16", "Q8_0", "Q6_K", "Q4_K", "Q4_0")
ONNX_PRECISIONS = ("fp32", "int4")
QUANTS = {"gguf": GGUF_QUANTS, "onnx": ONNX_PRECISIONS}
DEFAULT_QUANT = {"gguf": "Q8_0", "onnx": "fp32"}
# weights and bytes per block of each GGUF tensor type (gguf.GGML_QUANT_SIZES; spec stays free of the gguf package,
# tests/test_export.py checks the two agree)
QUANT_SIZES = {"F32": (1, 4), "F16": (1, 2), "Q8_0": (32, 34), "Q6_K": (256, 210), "Q5_0": (32, 22),
               "Q4_K": (256, 144), "Q4_0": (32, 18)}
# Q4_0 keeps Q8_0 (its blocks of 32 make every width a whole number of them; Q6_K's 256 would not); Q4_K Q6_K as
# llama.cpp's Q4_K_S and Q4_K_M files do
VOCABULARY_TYPE = {"Q4_0": "Q8_0", "Q4_K": "Q6_K"}
FALLBACK_TYPE = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's, for rows that are not whole super-blocks
KV_BYTES = 2  # llama.cpp keeps its KV cache in F16 by default
# llama.cpp gives its KV cache a multiple of 256 cells: measured with the xllamacpp wheel's build (bench/fits.py's
# llama_cpp_buffers), 300 tokens of context hold 512 cells, 1000 hold 1024, 2048 and 8192 hold themselves
KV_CELLS = 256
GGUF_ALIGNMENT = 32  # GGUFWriter's default (general.alignment unset)
GGUF_HEADER = 24  # magic, version, tensor count, metadata count
GGUF_NAME_MAX = 63  # GGML_MAX_NAME (64) less its NUL: llama.cpp refuses longer tensor names
OTHER_METADATA = 64 * 1024  # the metadata besides the tokenizer's arrays: SmolLM2's takes 1.6 KB, a long template 10
# GPT-2 stores its linear layers as Conv1D, [in, out]: the GGUF file holds them transposed ([out, in], rows of `in`)
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


# onnxruntime-genai's model builder picks its exporter by config.json's `architectures[0]`; of CBD's model types it
# has these (its 0.18 has no GPT-2 or GPT-NeoX exporter). GGUF takes every CBD family.
ONNX_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                      "qwen3": "Qwen3ForCausalLM"}


def gguf_filename(quant: str) -> str:
    return f"model-{quant}.gguf"


def export_path(fmt: str, quant: str) -> str:
    """Where an export lies in its sibling repository (`cbd/<model>-GGUF`, `cbd/<model>-ONNX`): GGUF is one file
    (`model-Q8_0.gguf`); ONNX a folder per precision (`int4/`: model.onnx, its external data, genai_config.json and
    the tokenizer files), as onnxruntime-genai loads it and as the Hub's ONNX repositories lay out precisions."""
    return gguf_filename(quant) if fmt == "gguf" else quant


def repo_suffix(fmt: str) -> str:
    return fmt.upper()


def check_quant(fmt: str, quant: str) -> None:
    if fmt not in QUANTS:
        raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    if quant not in QUANTS[fmt]:
        raise ValueError(f"{fmt} quant must be one of {', '.join(QUANTS[fmt])}, got {quant!r}")


def check_family(fmt: str, model_type: str | None) -> None:
    """Whether a model of `model_type` can be exported to `fmt` (ValueError naming the families that can)."""
    if fmt == "onnx" and model_type not in ONNX_ARCHITECTURES:
        raise ValueError(f"ONNX export supports the Llama family ({', '.join(ONNX_ARCHITECTURES)}), not "
                         f"{model_type!r}: onnxruntime-genai's model builder has no exporter for it; export it as "
                         "GGUF instead")


def gguf_tensor_type(quant: str, shape: tuple[int, ...], vocabulary: bool) -> str:
    """The GGUF type of a tensor of (GGUF, row-major) `shape` in a file of `quant`; `vocabulary`: the token
    embedding or the output head."""
    if len(shape) < 2:
        return "F32"
    kind = VOCABULARY_TYPE.get(quant, quant) if vocabulary else quant
    if shape[-1] % block_size(kind):
        kind = FALLBACK_TYPE.get(kind, "F16")
    return kind if shape[-1] % block_size(kind) == 0 else "F16"


def block_size(kind: str) -> int:
    """Weights per block of a GGUF tensor type: a row of a quantized tensor is a whole number of them."""
    return QUANT_SIZES[kind][0]


def gguf_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A tensor's shape as the GGUF file stores it (GPT-2's Conv1D weights transposed)."""
    return tuple(reversed(shape)) if name.endswith(CONV1D_SUFFIXES) else shape


def is_vocabulary(spec: TensorSpec) -> bool:
    return any(ax.kind == VOCAB for dim in spec.dims for ax in dim)


def _pad(size: int) -> int:
    return -(-size // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


def _string(text: str) -> int:
    """A GGUF string: its length (uint64) and its UTF-8 bytes."""
    return 8 + len(text.encode("utf-8"))


def _array(key: str, items: int) -> int:
    """A metadata entry holding an array: the key, the value type, the item type, the count, then `items` bytes."""
    return _string(key) + 4 + 4 + 8 + items


def check_gguf_tokenizer(tokenizer: dict) -> None:
    """The tokenizers a GGUF file of this writer carries: byte-level BPE (as GPT-2, SmolLM, Llama 3, Qwen use)."""
    model, decoder = tokenizer.get("model") or {}, (tokenizer.get("decoder") or {}).get("type")
    if model.get("type") != "BPE" or decoder != "ByteLevel":
        raise ValueError("GGUF export needs a byte-level BPE tokenizer (as GPT-2, SmolLM, Llama 3, Qwen use); this one "
                         f"is {model.get('type')!r} with a {decoder!r} decoder")


def tokenizer_vocab(tokenizer: dict) -> dict[str, int]:
    """tokenizer.json's token -> id, its added tokens included."""
    return {**(tokenizer.get("model") or {}).get("vocab", {}),
            **{t["content"]: t["id"] for t in tokenizer.get("added_tokens", [])}}


def gguf_tokens(vocab: dict[str, int], vocab_size: int) -> list[str]:
    """The GGUF token list: one entry per row of the model's vocabulary, rows no token uses named [PAD<i>]."""
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    for text, index in vocab.items():
        tokens[index] = text
    return tokens


def _merge(merge: str | list[str]) -> int:
    """A merge as gguf's SpecialVocab writes it: "a b", a space inside a part as U+0120 (two UTF-8 bytes)."""
    if isinstance(merge, str):
        return _string(merge)
    return _string(" ".join(merge)) + sum(part.count(" ") for part in merge)


def gguf_tokenizer_bytes(tokenizer: dict, vocab_size: int) -> int:
    """The metadata the writer takes from tokenizer.json (export/gguf.py `add_tokenizer`), exactly: the token list,
    a 4-byte type per token, and the merges."""
    check_gguf_tokenizer(tokenizer)
    tokens = sum(_string(token) for token in gguf_tokens(tokenizer_vocab(tokenizer), vocab_size))
    merges = sum(_merge(merge) for merge in (tokenizer.get("model") or {}).get("merges", []))
    return (_array("tokenizer.ggml.tokens", tokens) + _array("tokenizer.ggml.token_type", 4 * vocab_size)
            + _array("tokenizer.ggml.merges", merges))


@dataclass(frozen=True)
class DeviceBytes:
    """What a model of a shape takes on the device in a format, and how that is counted."""

    weights: int  # the tensors' data
    overhead: int  # the rest of the file: header, metadata, tensor index, alignment (an upper bound)
    kv_cache: int
    by_type: dict[str, dict[str, int]]  # {"params", "bytes"} per tensor type: the fallbacks to F16 show here

    @property
    def file(self) -> int:
        return self.weights + self.overhead

    @property
    def total(self) -> int:
        return self.file + self.kv_cache

    def fallback(self, quant: str) -> int:
        """Parameters in tensors of a fallback type in a quantized file (rows not a whole number of blocks)."""
        return sum(self.by_type.get(kind, {}).get("params", 0) for kind in fallback_types(quant))


def fallback_types(quant: str) -> set[str]:
    """The types a file of `quant` holds only where rows are not whole blocks of the type it asks for."""
    if quant == "F16":
        return set()
    wanted = {quant, VOCABULARY_TYPE.get(quant, quant)}
    return {"F16"} | {FALLBACK_TYPE[kind] for kind in wanted if kind in FALLBACK_TYPE}


def kv_cache_bytes(shape: Shape, context: int) -> int:
    """K and V for every layer and cell: 2 x layers x cells x kv_heads x head_dim, F16; the cells are the context
    rounded up to a multiple of KV_CELLS."""
    cells = -(-context // KV_CELLS) * KV_CELLS
    return 2 * shape.num_layers * cells * shape.num_kv_heads * shape.head_dim * KV_BYTES


def _gguf_tensors(arch: Architecture, shape: Shape, quant: str) -> list[tuple[tuple[int, ...], str, int]]:
    """(GGUF shape, type, data bytes) of each tensor a GGUF file of this shape holds (a tied head is not written:
    llama.cpp reuses the embedding)."""
    tensors = []
    for name, spec, _ in arch.tensor_names(shape):
        dims = gguf_shape(name, arch.tensor_shape(spec, shape))
        kind = gguf_tensor_type(quant, dims, is_vocabulary(spec))
        weights_per_block, block_bytes = QUANT_SIZES[kind]
        tensors.append((dims, kind, math.ceil(math.prod(dims) * block_bytes / weights_per_block)))
    return tensors


def gguf_weight_bytes(arch: Architecture, shape: Shape, quant: str) -> tuple[int, dict[str, dict[str, int]]]:
    """The tensor data of a GGUF file of this shape, and its parameters and bytes per tensor type."""
    by_type: dict[str, dict[str, int]] = {}
    for dims, kind, size in _gguf_tensors(arch, shape, quant):
        counts = by_type.setdefault(kind, {"params": 0, "bytes": 0})
        counts["params"] += math.prod(dims)
        counts["bytes"] += size
    return sum(counts["bytes"] for counts in by_type.values()), by_type


def gguf_overhead_bytes(arch: Architecture, shape: Shape, quant: str, tokenizer_bytes: int) -> int:
    """The file's bytes besides the tensor data, at most: header, metadata (the tokenizer's arrays as counted by
    `gguf_tokenizer_bytes`, the rest as OTHER_METADATA), the tensor index (names at their longest), and the
    alignment of the index and of each tensor's data."""
    tensors = _gguf_tensors(arch, shape, quant)
    index = sum(8 + GGUF_NAME_MAX + 4 + 8 * len(dims) + 4 + 8 for dims, _, _ in tensors)
    alignment = sum(_pad(size) - size for _, _, size in tensors)
    return _pad(GGUF_HEADER + tokenizer_bytes + OTHER_METADATA + index) + alignment


def device_bytes(arch: Architecture, shape: Shape, fmt: str, quant: str, context: int,
                 tokenizer_bytes: int) -> DeviceBytes:
    """The GGUF file of this shape in `quant` (its tokenizer's arrays taking `tokenizer_bytes`) and its KV cache
    at `context` tokens."""
    check_quant(fmt, quant)
    if fmt != "gguf":
        raise ValueError(f"sizes are counted for gguf files only, not {fmt}")
    weights, by_type = gguf_weight_bytes(arch, shape, quant)
    return DeviceBytes(weights, gguf_overhead_bytes(arch, shape, quant, tokenizer_bytes),
                       kv_cache_bytes(shape, context), by_type)
