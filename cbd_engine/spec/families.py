"""Architecture adapters, declared as data (torch-free).

Each family lists its tensors and, for every dimension of every tensor, what that dimension means: residual width,
query heads, KV heads, FFN neurons, vocabulary, positions or head_dim, and whether the tensor reads those units
(`IN`), produces them (`OUT`), or is a norm gain/shift over them. One generic transform (materialization/transforms.py)
expands, subsets and interpolates every family from these declarations; parameter counts come from them too.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cbd_engine.spec.shapes import SHAPE_AXES, Shape, ShapeError

# axis kinds
RESIDUAL, HEADS, KV_HEADS, FFN, VOCAB, POSITIONS, HEAD_DIM = (
    "residual", "heads", "kv_heads", "ffn", "vocab", "positions", "head_dim"
)
# roles of a dimension
IN, OUT, GAIN, SHIFT = "in", "out", "gain", "shift"
RESIZABLE = (RESIDUAL, HEADS, KV_HEADS, FFN)


@dataclass(frozen=True)
class Axis:
    kind: str
    role: str
    unit: int = 1  # rows per unit, in head_dims for heads (GPT-NeoX interleaves q, k, v per head: 3)


@dataclass(frozen=True)
class TensorSpec:
    """`name` may contain `{layer}`; `dims` holds, per dimension, the axes concatenated along it (GPT-2's c_attn)."""

    name: str
    dims: tuple[tuple[Axis, ...], ...]

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.name

    @property
    def writes_residual(self) -> bool:
        """Residual writers (attention output, MLP down projection) are zeroed in a fresh layer: it stays inert."""
        return any(ax.kind == RESIDUAL and ax.role == OUT for dim in self.dims for ax in dim)


def _t(name: str, *dims: Axis | tuple[Axis, ...]) -> TensorSpec:
    return TensorSpec(name, tuple(d if isinstance(d, tuple) else (d,) for d in dims))


def axis_units(shape: Shape, kind: str) -> int:
    return {
        RESIDUAL: shape.hidden_size,
        HEADS: shape.num_heads,
        KV_HEADS: shape.num_kv_heads,
        FFN: shape.intermediate_size,
        VOCAB: shape.vocab_size,
        POSITIONS: shape.max_position_embeddings,
        HEAD_DIM: shape.head_dim,
    }[kind]


def unit_rows(shape: Shape, axis: Axis) -> int:
    return axis.unit * (shape.head_dim if axis.kind in (HEADS, KV_HEADS) else 1)


def dim_size(shape: Shape, dim: tuple[Axis, ...]) -> int:
    return sum(axis_units(shape, ax.kind) * unit_rows(shape, ax) for ax in dim)


@dataclass(frozen=True)
class Architecture:
    """A family plus the config flags that decide which tensors exist (biases, q/k norms, tied head)."""

    family: str
    norm: str  # "layernorm" (mean-padding on growth) or "rmsnorm" (zero-padding)
    hidden_follows_heads: bool
    tensors: tuple[TensorSpec, ...]
    attn_out_module: str  # its input is the concatenated head outputs (head importance)
    ffn_out_module: str  # its input is the FFN activations (neuron importance)
    layers_module: str
    flags: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # transformers' LlamaConfig refuses hidden_size % num_heads != 0 even with a decoupled head_dim
    hidden_divisible_by_heads: bool = False

    def tensor_shape(self, spec: TensorSpec, shape: Shape) -> tuple[int, ...]:
        return tuple(dim_size(shape, dim) for dim in spec.dims)

    def tensor_names(self, shape: Shape) -> list[tuple[str, TensorSpec, int | None]]:
        """Every tensor of a model of this shape in declaration order, layers expanded: (name, spec, layer or None)."""
        first_layer = next(i for i, spec in enumerate(self.tensors) if spec.per_layer)
        before = [(s.name, s, None) for s in self.tensors[:first_layer] if not s.per_layer]
        after = [(s.name, s, None) for s in self.tensors[first_layer:] if not s.per_layer]
        layers = [(s.name.format(layer=i), s, i) for i in range(shape.num_layers) for s in self.tensors if s.per_layer]
        return before + layers + after

    def num_params(self, shape: Shape) -> int:
        """Parameters as transformers counts them (a tied head once)."""
        total = 0
        for spec in self.tensors:
            count = math.prod(self.tensor_shape(spec, shape))
            total += count * (shape.num_layers if spec.per_layer else 1)
        return total

    def validate(self, shape: Shape) -> None:
        if self.hidden_divisible_by_heads and shape.hidden_size % shape.num_heads:
            raise ShapeError(
                f"{self.flags.get('model_type')} needs hidden_size ({shape.hidden_size}) to be a multiple of "
                f"num_heads ({shape.num_heads})"
            )
        if self.hidden_follows_heads and shape.hidden_size != shape.num_heads * shape.head_dim:
            raise ShapeError(
                f"{self.family} needs hidden_size == num_heads * head_dim "
                f"({shape.num_heads} * {shape.head_dim} = {shape.num_heads * shape.head_dim}), got {shape.hidden_size}"
            )
        if self.hidden_follows_heads and shape.num_kv_heads != shape.num_heads:
            raise ShapeError(f"{self.family} has no grouped-query attention: num_kv_heads must equal num_heads")


@dataclass(frozen=True)
class Family:
    """A family: its model types, its tensors (by config flags), and which config.json key holds each shape field."""

    name: str
    model_types: tuple[str, ...]
    architecture: Callable[[dict[str, Any], bool], Architecture]  # (config, tied) -> Architecture
    keys: dict[str, str]  # Shape field -> config key; fields without a key are derived (see read_shape)
    eps_key: str
    tied_by_default: bool

    def read_shape(self, config: dict[str, Any]) -> Shape:
        def value(field: str) -> Any:
            return config.get(self.keys[field]) if field in self.keys else None

        heads, hidden = value("num_heads"), value("hidden_size")
        return Shape(
            num_layers=value("num_layers"),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=value("num_kv_heads") or heads,
            head_dim=value("head_dim") or hidden // heads,
            intermediate_size=value("intermediate_size") or 4 * hidden,  # GPT-2's n_inner: None means 4 x hidden
            vocab_size=config["vocab_size"],
            max_position_embeddings=value("max_position_embeddings"),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", self.tied_by_default)),
        )

    def write_shape(self, config: dict[str, Any], shape: Shape) -> dict[str, Any]:
        resized = {key: getattr(shape, field) for field, key in self.keys.items() if field in SHAPE_AXES}
        return {**config, **resized}


# -------------------------------------------------------------- the Llama family (Llama, Mistral, Qwen2, Qwen3, SmolLM)

def _llama_architecture(config: dict[str, Any], tied: bool) -> Architecture:
    model_type = config.get("model_type", "llama")
    qkv_bias = model_type == "qwen2" or bool(config.get("attention_bias", False))
    o_bias = model_type != "qwen2" and bool(config.get("attention_bias", False))
    mlp_bias = bool(config.get("mlp_bias", False))
    layer = "model.layers.{layer}"
    res_in, res_out, gain = Axis(RESIDUAL, IN), Axis(RESIDUAL, OUT), Axis(RESIDUAL, GAIN)
    heads_out, heads_in = Axis(HEADS, OUT), Axis(HEADS, IN)
    kv_out, ffn_out, ffn_in = Axis(KV_HEADS, OUT), Axis(FFN, OUT), Axis(FFN, IN)
    tensors = [
        _t("model.embed_tokens.weight", Axis(VOCAB, IN), res_out),
        _t(f"{layer}.input_layernorm.weight", gain),
        _t(f"{layer}.self_attn.q_proj.weight", heads_out, res_in),
        _t(f"{layer}.self_attn.k_proj.weight", kv_out, res_in),
        _t(f"{layer}.self_attn.v_proj.weight", kv_out, res_in),
    ]
    if qkv_bias:
        tensors += [
            _t(f"{layer}.self_attn.q_proj.bias", heads_out),
            _t(f"{layer}.self_attn.k_proj.bias", kv_out),
            _t(f"{layer}.self_attn.v_proj.bias", kv_out),
        ]
    tensors.append(_t(f"{layer}.self_attn.o_proj.weight", res_out, heads_in))
    if o_bias:
        tensors.append(_t(f"{layer}.self_attn.o_proj.bias", res_out))
    if model_type == "qwen3":
        tensors += [
            _t(f"{layer}.self_attn.q_norm.weight", Axis(HEAD_DIM, GAIN)),
            _t(f"{layer}.self_attn.k_norm.weight", Axis(HEAD_DIM, GAIN)),
        ]
    tensors += [
        _t(f"{layer}.post_attention_layernorm.weight", gain),
        _t(f"{layer}.mlp.gate_proj.weight", ffn_out, res_in),
        _t(f"{layer}.mlp.up_proj.weight", ffn_out, res_in),
        _t(f"{layer}.mlp.down_proj.weight", res_out, ffn_in),
    ]
    if mlp_bias:
        tensors += [
            _t(f"{layer}.mlp.gate_proj.bias", ffn_out),
            _t(f"{layer}.mlp.up_proj.bias", ffn_out),
            _t(f"{layer}.mlp.down_proj.bias", res_out),
        ]
    tensors.append(_t("model.norm.weight", gain))
    if not tied:
        tensors.append(_t("lm_head.weight", Axis(VOCAB, OUT), res_in))
    return Architecture(
        family="llama",
        norm="rmsnorm",
        hidden_follows_heads=False,
        tensors=tuple(tensors),
        attn_out_module=f"{layer}.self_attn.o_proj",
        ffn_out_module=f"{layer}.mlp.down_proj",
        layers_module="model.layers",
        flags={"model_type": model_type},
        hidden_divisible_by_heads=model_type == "llama",
    )


# ---------------------------------------------------------------- GPT-2

def _gpt2_architecture(config: dict[str, Any], tied: bool) -> Architecture:
    layer = "transformer.h.{layer}"
    res_in, res_out = Axis(RESIDUAL, IN), Axis(RESIDUAL, OUT)
    qkv_out = (Axis(HEADS, OUT), Axis(KV_HEADS, OUT), Axis(KV_HEADS, OUT))  # c_attn is laid out [q | k | v]
    ln = (Axis(RESIDUAL, GAIN),), (Axis(RESIDUAL, SHIFT),)
    tensors = [
        _t("transformer.wte.weight", Axis(VOCAB, IN), res_out),
        _t("transformer.wpe.weight", Axis(POSITIONS, IN), res_out),
        TensorSpec(f"{layer}.ln_1.weight", (ln[0],)),
        TensorSpec(f"{layer}.ln_1.bias", (ln[1],)),
        _t(f"{layer}.attn.c_attn.weight", res_in, qkv_out),  # Conv1D: [in, out]
        _t(f"{layer}.attn.c_attn.bias", qkv_out),
        _t(f"{layer}.attn.c_proj.weight", Axis(HEADS, IN), res_out),
        _t(f"{layer}.attn.c_proj.bias", res_out),
        TensorSpec(f"{layer}.ln_2.weight", (ln[0],)),
        TensorSpec(f"{layer}.ln_2.bias", (ln[1],)),
        _t(f"{layer}.mlp.c_fc.weight", res_in, Axis(FFN, OUT)),
        _t(f"{layer}.mlp.c_fc.bias", Axis(FFN, OUT)),
        _t(f"{layer}.mlp.c_proj.weight", Axis(FFN, IN), res_out),
        _t(f"{layer}.mlp.c_proj.bias", res_out),
        TensorSpec("transformer.ln_f.weight", (ln[0],)),
        TensorSpec("transformer.ln_f.bias", (ln[1],)),
    ]
    if not tied:
        tensors.append(_t("lm_head.weight", Axis(VOCAB, OUT), res_in))
    return Architecture(
        family="gpt2",
        norm="layernorm",
        hidden_follows_heads=True,
        tensors=tuple(tensors),
        attn_out_module=f"{layer}.attn.c_proj",
        ffn_out_module=f"{layer}.mlp.c_proj",
        layers_module="transformer.h",
        flags={"model_type": "gpt2"},
    )


# ---------------------------------------------------------------- GPT-NeoX / Pythia

def _neox_architecture(config: dict[str, Any], tied: bool) -> Architecture:
    layer = "gpt_neox.layers.{layer}"
    res_in, res_out = Axis(RESIDUAL, IN), Axis(RESIDUAL, OUT)
    qkv_out = Axis(HEADS, OUT, unit=3)  # fused per head: [head0 q k v | head1 q k v | ...]
    gain, shift = Axis(RESIDUAL, GAIN), Axis(RESIDUAL, SHIFT)
    tensors = [
        _t("gpt_neox.embed_in.weight", Axis(VOCAB, IN), res_out),
        _t(f"{layer}.input_layernorm.weight", gain),
        _t(f"{layer}.input_layernorm.bias", shift),
        _t(f"{layer}.post_attention_layernorm.weight", gain),
        _t(f"{layer}.post_attention_layernorm.bias", shift),
        _t(f"{layer}.attention.query_key_value.weight", qkv_out, res_in),
        _t(f"{layer}.attention.query_key_value.bias", qkv_out),
        _t(f"{layer}.attention.dense.weight", res_out, Axis(HEADS, IN)),
        _t(f"{layer}.attention.dense.bias", res_out),
        _t(f"{layer}.mlp.dense_h_to_4h.weight", Axis(FFN, OUT), res_in),
        _t(f"{layer}.mlp.dense_h_to_4h.bias", Axis(FFN, OUT)),
        _t(f"{layer}.mlp.dense_4h_to_h.weight", res_out, Axis(FFN, IN)),
        _t(f"{layer}.mlp.dense_4h_to_h.bias", res_out),
        _t("gpt_neox.final_layer_norm.weight", gain),
        _t("gpt_neox.final_layer_norm.bias", shift),
    ]
    if not tied:
        tensors.append(_t("embed_out.weight", Axis(VOCAB, OUT), res_in))
    return Architecture(
        family="gpt_neox",
        norm="layernorm",
        hidden_follows_heads=True,
        tensors=tuple(tensors),
        attn_out_module=f"{layer}.attention.dense",
        ffn_out_module=f"{layer}.mlp.dense_4h_to_h",
        layers_module="gpt_neox.layers",
        flags={"model_type": "gpt_neox"},
    )


LLAMA_KEYS = {"num_layers": "num_hidden_layers", "hidden_size": "hidden_size", "num_heads": "num_attention_heads",
              "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim", "intermediate_size": "intermediate_size",
              "max_position_embeddings": "max_position_embeddings"}
FAMILIES = (
    Family("llama", ("llama", "mistral", "qwen2", "qwen3"), _llama_architecture, LLAMA_KEYS, "rms_norm_eps", False),
    Family("gpt2", ("gpt2",), _gpt2_architecture,
           {"num_layers": "n_layer", "hidden_size": "n_embd", "num_heads": "n_head", "intermediate_size": "n_inner",
            "max_position_embeddings": "n_positions"}, "layer_norm_epsilon", True),
    Family("gpt_neox", ("gpt_neox",), _neox_architecture,
           {k: v for k, v in LLAMA_KEYS.items() if k not in ("num_kv_heads", "head_dim")}, "layer_norm_eps", False),
)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_of(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ShapeError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")


@dataclass(frozen=True)
class ModelSpec:
    """What a config.json says about a model: its family, architecture and shape."""

    family: Family
    architecture: Architecture
    shape: Shape
    config: dict[str, Any]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ModelSpec:
        family = family_of(config)
        shape = family.read_shape(config)
        architecture = family.architecture(config, shape.tie_word_embeddings)
        return cls(family, architecture, shape, config)

    @property
    def num_params(self) -> int:
        return self.architecture.num_params(self.shape)

    @property
    def eps(self) -> float:
        return float(self.config.get(self.family.eps_key, 1e-5))

    def config_for(self, shape: Shape, eps: float | None = None) -> dict[str, Any]:
        config = self.family.write_shape(self.config, shape)
        config.pop("layer_types", None)  # per-layer lists (Qwen3) are rebuilt by transformers for the new depth
        config.pop("quantization_config", None)
        config.pop("_name_or_path", None)
        if eps is not None:
            config[self.family.eps_key] = eps
        return config


def read_config(folder: str | Path) -> dict:
    """A model folder's config.json (plain JSON: the service reads it without torch)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a model folder: no config.json")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
