"""The POST /chains `bridge` object, checked (torch-free): the bridge model (a checkpoint or a fresh shape of a
family) and how the source answers its prompts. The SeqKD stage itself is pipelines/bridge.py."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from cbd_engine.spec.families import FAMILIES, Family, ModelSpec
from cbd_engine.spec.shapes import Shape, ShapeError

BRIDGE_FIELDS = ("model", "tokenizer", "method", "num_samples", "epochs", "learning_rate", "generation")
DEFAULT_POSITIONS = 1024  # a fresh bridge's max_position_embeddings unless the shape gives one (GPT-2's)
GPT2_VOCAB = 50257  # the default tokenizer's size, for estimates made before it is fetched


@dataclass(frozen=True)
class GenerationParams:
    """How the source answers; every field is part of the cache key and of the bridge's provenance."""

    do_sample: bool = True  # sample at `temperature` (SeqKD on samples of the source's distribution); False: greedy
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    responses_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 16  # with sampling, the batches decide which random numbers each answer gets
    max_length: int = 512  # prompt + answer; longer prompts lose their start

    def __post_init__(self) -> None:
        where = "bridge.generation"
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"{where}.temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"{where}.top_p must be in (0, 1], got {self.top_p}")
        if not 1 <= self.max_new_tokens < self.max_length:
            raise ValueError(f"{where}.max_new_tokens must be in [1, max_length={self.max_length}), "
                             f"got {self.max_new_tokens}")
        if self.responses_per_prompt < 1 or self.batch_size < 1:
            raise ValueError(f"{where}.responses_per_prompt and batch_size must be >= 1")
        if self.responses_per_prompt > 1 and not self.do_sample:
            raise ValueError(f"{where}.responses_per_prompt > 1 needs do_sample: greedy answers would be copies")

    @classmethod
    def from_dict(cls, data: dict | None) -> GenerationParams:
        data = {key: value for key, value in (data or {}).items() if value is not None}
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(data) - set(allowed))
        if unknown:
            raise ValueError(f"bridge.generation has unknown fields {unknown}; allowed: {allowed}")
        for f in fields(cls):
            if f.name in data and not _has_type(data[f.name], type(f.default)):
                raise ValueError(f"bridge.generation.{f.name} must be of type {type(f.default).__name__}, "
                                 f"got {data[f.name]!r}")
        return cls(**data)


def _has_type(value: object, kind: type) -> bool:
    """JSON's types: a bool is no number, an integer is a float too."""
    if kind is bool or isinstance(value, bool):
        return kind is bool and isinstance(value, bool)
    return isinstance(value, int | float) if kind is float else isinstance(value, kind)


@dataclass(frozen=True)
class BridgeSpec:
    """The POST /chains `bridge` object; null fields count as absent (the API's optional fields arrive as null)."""

    model: str | dict  # a checkpoint (local folder, .gguf or hub id), or a shape with a `family` (fresh init)
    tokenizer: str | None = None  # with a shape: a tokenizer folder (default for gpt2: GPT-2's own)
    num_samples: int | None = None  # the first N training prompts are answered; None: all of them
    epochs: float = 1.0  # passes over the answers
    learning_rate: float | None = None  # None: the chain's distillation learning rate
    generation: GenerationParams = field(default_factory=GenerationParams)

    @property
    def is_shape(self) -> bool:
        return isinstance(self.model, dict)

    @classmethod
    def parse(cls, data: dict, max_length: int) -> BridgeSpec:
        """Check a `bridge` object; `max_length` is the chain's, which a fresh bridge's positions must hold."""
        if not isinstance(data, dict):
            raise ValueError("bridge must be an object {model, method: 'seqkd', num_samples, epochs} or null")
        data = {key: value for key, value in data.items() if value is not None}
        unknown = sorted(set(data) - set(BRIDGE_FIELDS))
        if unknown:
            raise ValueError(f"bridge has unknown fields {unknown}; allowed: {list(BRIDGE_FIELDS)}")
        if data.get("method", "seqkd") != "seqkd":
            raise ValueError(f"bridge.method must be 'seqkd', got {data['method']!r}")
        model = data.get("model")
        if not model or not isinstance(model, str | dict):
            raise ValueError("bridge.model is required: a checkpoint (folder, .gguf or hub id) or a shape object "
                             "with a family")
        if isinstance(model, dict):
            if model.get("family", "gpt2") != "gpt2" and not data.get("tokenizer"):
                raise ValueError("bridge.tokenizer is required for a shape of a family other than gpt2")
            positions = planned_spec(model).shape.max_position_embeddings
            if positions < max_length:
                raise ValueError(f"bridge.model.max_position_embeddings ({positions}) must hold the chain's "
                                 f"max_length ({max_length})")
        elif data.get("tokenizer"):
            raise ValueError("bridge.tokenizer goes with a shape; a checkpoint brings its own tokenizer")
        num_samples = data.get("num_samples")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"bridge.num_samples must be a positive integer, got {num_samples!r}")
        epochs, learning_rate = data.get("epochs", 1), data.get("learning_rate")
        if not _has_type(epochs, float) or epochs <= 0:
            raise ValueError(f"bridge.epochs must be a number > 0, got {epochs!r}")
        if learning_rate is not None and not (_has_type(learning_rate, float) and 0 < learning_rate <= 1):
            raise ValueError(f"bridge.learning_rate must be in (0, 1], got {learning_rate!r}")
        return cls(model, data.get("tokenizer"), num_samples, float(epochs), learning_rate,
                   GenerationParams.from_dict(data.get("generation")))


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"bridge.model.family must be one of {[f.name for f in FAMILIES]}, got {name!r}")


def bridge_config(model: dict, vocab_size: int) -> dict:
    """config.json of a fresh bridge of shape `model` ({family, num_layers, hidden_size, num_heads, intermediate_size,
    optional num_kv_heads, head_dim, vocab_size, max_position_embeddings, tie_word_embeddings}); `vocab_size` is the
    tokenizer's, which a given vocab_size may exceed (padding), never undercut."""
    values = {key: value for key, value in model.items() if value is not None}
    family = family_named(values.pop("family", "gpt2"))
    heads, hidden = values.get("num_heads"), values.get("hidden_size")
    if isinstance(heads, int) and isinstance(hidden, int) and heads > 0:
        values.setdefault("num_kv_heads", heads)  # full multi-head attention unless told
        values.setdefault("head_dim", hidden // heads)
    values.setdefault("vocab_size", vocab_size)
    values.setdefault("max_position_embeddings", DEFAULT_POSITIONS)
    values.setdefault("tie_word_embeddings", family.tied_by_default)
    try:
        shape = Shape.from_dict(values)
        if shape.vocab_size < vocab_size:
            raise ShapeError(f"vocab_size ({shape.vocab_size}) is smaller than the tokenizer's ({vocab_size})")
        config = family.write_shape({"model_type": family.model_types[0], "vocab_size": shape.vocab_size,
                                     family.keys["max_position_embeddings"]: shape.max_position_embeddings,
                                     "tie_word_embeddings": shape.tie_word_embeddings}, shape)
        ModelSpec.from_config(config).architecture.validate(shape)
    except ShapeError as error:
        raise ValueError(f"bridge.model: {error}") from None
    return config


def planned_spec(model: dict) -> ModelSpec:
    """A bridge shape's spec before its tokenizer is read: with the shape's vocab_size, else GPT-2's."""
    return ModelSpec.from_config(bridge_config(model, model.get("vocab_size") or GPT2_VOCAB))
