"""What an export is, checked and sized without torch: formats, quantization types, the families each format
takes, where an export lies in its sibling repository, and the bytes a model takes on the device (its weights in a
format plus its KV cache at a context).

One table of GGUF tensor types serves the writer (cbd_engine/export/gguf.py, which asks `gguf_tensor_type` for each
tensor it writes) and the `fits` arithmetic (`device_bytes`), so the size the API promises is the file's size.

GGUF type of each tensor (as llama.cpp's own converter and quantizer choose them):
- 1-D tensors (norm gains and shifts, biases): F32, whatever the quant (llama.cpp reads them as F32).
- 2-D tensors at F16: F16.
- Q8_0 and Q4_0 quantize each row in blocks of 32 weights (34 and 18 bytes a block: a float16 scale and 32 int8 or
  32 int4 values); a tensor whose rows are not a whole number of blocks falls back to F16 (the converter does the
  same). For Q4_0 the token embedding and the output head stay Q8_0: llama.cpp's quantizer keeps those wider too
  (Q6_K, which the pure-Python `gguf.quants` cannot write), since 4-bit vocabulary rows cost most quality per byte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cbd_engine.spec.families import VOCAB, Architecture, TensorSpec
from cbd_engine.spec.shapes import Shape

EXPORT_FORMATS = ("gguf", "onnx")
GGUF_QUANTS = ("F16", "Q8_0", "Q4_0")
ONNX_PRECISIONS = ("fp32", "int4")
QUANTS = {"gguf": GGUF_QUANTS, "onnx": ONNX_PRECISIONS}
DEFAULT_QUANT = {"gguf": "Q8_0", "onnx": "fp32"}
BLOCK = 32  # weights per block of Q8_0 and Q4_0
# bytes per weight of each GGUF tensor type
TYPE_BYTES = {"F32": 4.0, "F16": 2.0, "Q8_0": 34 / 32, "Q4_0": 18 / 32}
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
    if quant == "F16" or shape[-1] % BLOCK:
        return "F16"
    return "Q8_0" if quant == "Q4_0" and vocabulary else quant


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
        total += count * TYPE_BYTES[kind]
        by_type[kind] = by_type.get(kind, 0) + count
    return math.ceil(total), by_type


def device_bytes(arch: Architecture, shape: Shape, fmt: str, quant: str, context: int) -> DeviceBytes:
    check_quant(fmt, quant)
    if fmt != "gguf":
        raise ValueError(f"sizes are counted for gguf files only, not {fmt}")
    weights, by_type = gguf_weight_bytes(arch, shape, quant)
    return DeviceBytes(weights, kv_cache_bytes(shape, context), by_type)
