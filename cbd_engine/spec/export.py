"""What an export is, checked and sized without torch: formats, quantization types, the families each format
takes, where an export lies in its sibling repository, and the bytes a model takes on the device (its weights in a
format plus its KV cache at a context).

One table of GGUF tensor types serves the writer (cbd_engine/export/gguf.py, which asks `gguf_tensor_type` for each
tensor it writes) and the `fits` arithmetic (`device_bytes`), so the size the API promises is the file's size.

GGUF type of each tensor (the rules of llama.cpp's own converter and quantizer, `llama_tensor_get_type`):
- 1-D tensors (norm gains and shifts, biases): F32, whatever the quant (llama.cpp reads them as F32).
- 2-D tensors at F16: F16.
- Q8_0 and Q4_0 quantize each row in blocks of 32 weights (34 and 18 bytes a block: a float16 scale and 32 int8 or
  32 int4 values); Q6_K and Q4_K in super-blocks of 256 (210 and 144 bytes: 6.56 and 4.5 bits a weight).
- The vocabulary (token embedding and output head) is kept wider at 4 bits, Q6_K, as llama.cpp's quantizer does:
  4-bit vocabulary rows cost most quality per byte.
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
VOCABULARY_TYPE = {"Q4_0": "Q6_K", "Q4_K": "Q6_K"}
FALLBACK_TYPE = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # llama.cpp's, for rows that are not whole super-blocks
KV_BYTES = 2  # llama.cpp keeps its KV cache in F16 by default
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


@dataclass(frozen=True)
class DeviceBytes:
    """What a model of a shape takes on the device in a format, and how that is counted."""

    weights: int
    kv_cache: int
    by_type: dict[str, int]  # parameters per tensor type: the fallbacks to a wider type show here

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def kv_cache_bytes(shape: Shape, context: int) -> int:
    """K and V for every layer and position: 2 x layers x context x kv_heads x head_dim, F16."""
    return 2 * shape.num_layers * context * shape.num_kv_heads * shape.head_dim * KV_BYTES


def gguf_weight_bytes(arch: Architecture, shape: Shape, quant: str) -> tuple[int, dict[str, int]]:
    """The tensor data of a GGUF file of this shape (a tied head is not written: llama.cpp reuses the embedding)."""
    total, by_type = 0.0, {}
    for name, spec, _ in arch.tensor_names(shape):
        dims = gguf_shape(name, arch.tensor_shape(spec, shape))
        kind = gguf_tensor_type(quant, dims, is_vocabulary(spec))
        count = math.prod(dims)
        weights_per_block, block_bytes = QUANT_SIZES[kind]
        total += count * block_bytes / weights_per_block
        by_type[kind] = by_type.get(kind, 0) + count
    return math.ceil(total), by_type


def device_bytes(arch: Architecture, shape: Shape, fmt: str, quant: str, context: int) -> DeviceBytes:
    check_quant(fmt, quant)
    if fmt != "gguf":
        raise ValueError(f"sizes are counted for gguf files only, not {fmt}")
    weights, by_type = gguf_weight_bytes(arch, shape, quant)
    return DeviceBytes(weights, kv_cache_bytes(shape, context), by_type)
