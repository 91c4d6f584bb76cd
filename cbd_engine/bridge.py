"""The SeqKD bridge (paper section 3.1, scenario 2; appendix B): a source of another architecture or vocabulary is
first distilled into a bridge model of the chain's architecture by sequence-level KD, and the bridge is anchor zero.

  1. the source answers the data set's prompts (batched; sampling parameters recorded); the answers are cached by
     (source weights, prompt texts, parameters), so a second chain from the same source reuses them, and kept part
     by part while they are generated, so an interrupted generation resumes
  2. the bridge starts from a checkpoint (as the paper's GPT2-XL) or, for a shape of a family, from a fresh init,
     with its own tokenizer (a gpt2 shape: GPT-2's, from `zoo.gpt2_tokenizer`)
  3. the bridge is fine-tuned with plain cross-entropy on the source's answers encoded with its own tokenizer, and
     validated on the source's answers to the validation rows' prompts (chain.py runs this stage)

Torch-free at import: the service checks bridge specs without torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from cbd_engine.data import InstructionRow
from cbd_engine.families import FAMILIES, Family, ModelSpec
from cbd_engine.files import write_text_atomically
from cbd_engine.progress import Cancelled, ProgressCallback, StageTimer, no_progress
from cbd_engine.shapes import Shape, ShapeError

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


def default_tokenizer(bridge: BridgeSpec) -> Path:
    """The fresh bridge's tokenizer folder: the given one, else (a gpt2 shape) GPT-2's own."""
    if bridge.tokenizer:
        return Path(bridge.tokenizer)
    from cbd_engine.zoo import gpt2_tokenizer

    return gpt2_tokenizer()


def init_bridge(bridge: BridgeSpec, out: Path, seed: int) -> Path:
    """A fresh model of the bridge's shape (seeded) with its tokenizer, written atomically to `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cbd_engine.batches import pad_id_of
    from cbd_engine.checkpoint import atomic_output_dir, copy_side_files
    from cbd_engine.models import load_tokenizer

    tokenizer_dir = default_tokenizer(bridge)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = bridge_config(bridge.model, len(tokenizer))
    eos = tokenizer.eos_token_id
    special = {"bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
               "eos_token_id": eos, "pad_token_id": pad_id_of(tokenizer)}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config, **special))
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(tokenizer_dir, tmp)
        (tmp / "cbd.json").write_text(json.dumps({"bridge_init": {"shape": bridge.model, "seed": seed,
                                                                  "tokenizer": str(tokenizer_dir)}}, indent=1))
    return out


# --- the source's answers, cached -----------------------------------------------------------------------------------


def generation_cache_dir() -> Path:
    """Where answers are cached: $CBD_GENERATIONS_DIR, else `generations` in the engine's cache (~/.cache/cbd)."""
    from cbd_engine.zoo import cache_dir

    return Path(os.environ.get("CBD_GENERATIONS_DIR") or cache_dir() / "generations")


@dataclass
class Generations:
    rows: list[InstructionRow]  # the asked rows, each `responses_per_prompt` times, the source's answer as output
    key: str  # sha256 of (source weights, prompt texts, parameters)
    path: Path  # the cached JSONL (instruction, input, output): readable as an instruction data set
    stats: dict  # of the run that generated them: prompts, responses, response_tokens, seconds, device
    cached: bool  # read from the cache, nothing generated


def generation_key(weight_hashes: dict[str, str], prompts: list[str], params: GenerationParams) -> str:
    payload = {"source_weights": weight_hashes, "prompts": prompts, "params": asdict(params)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def generate_responses(source_dir: Path, rows: list[InstructionRow], params: GenerationParams, cache_dir: Path,
                       prompt_format: str = "alpaca", *, device: str = "auto", stage: str = "generate",
                       progress: ProgressCallback = no_progress, should_stop: Callable[[], bool] | None = None,
                       ) -> Generations:
    """The source's answers to the prompts of `rows` (`params.responses_per_prompt` each, cut at EOS or "###"),
    read from `cache_dir` when the same source answered the same prompts with the same parameters before. An
    interrupted generation resumes after its last finished part; a second process asking for the same answers
    waits for the first (a lock per key) and reads them."""
    from cbd_engine.batches import format_prompt
    from cbd_engine.checkpoint import folder_hashes
    from cbd_engine.data import read_instruction_rows
    from cbd_engine.models import load_tokenizer, resolve_device

    if not rows:
        raise ValueError("the source has no prompts to answer")
    tokenizer = load_tokenizer(source_dir)
    asked = [row for row in rows for _ in range(params.responses_per_prompt)]
    prompts = [format_prompt(tokenizer, row, prompt_format)[0] for row in asked]
    key = generation_key(folder_hashes(source_dir), prompts, params)
    cache_dir = Path(cache_dir)
    path, meta_path, parts_path = (cache_dir / f"{key}{suffix}" for suffix in (".jsonl", ".json", ".parts.jsonl"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if path.is_file() and meta_path.is_file():
            stats = json.loads(meta_path.read_text())["stats"]
            return Generations(read_instruction_rows(path), key, path, stats, True)
        started = time.monotonic()
        answers = _generate(source_dir, tokenizer, prompts, params, prompt_format, device, stage, progress,
                            should_stop, parts_path)
        response_tokens = sum(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"])
        stats = {"prompts": len(rows), "responses": len(asked), "response_tokens": response_tokens,
                 "seconds": round(time.monotonic() - started, 2), "device": str(resolve_device(device))}
        generated = [InstructionRow(row.instruction, row.input, answer)
                     for row, answer in zip(asked, answers, strict=True)]
        meta = {"source": str(source_dir), "prompt_format": prompt_format, "params": asdict(params), "stats": stats}
        write_text_atomically(meta_path, json.dumps(meta, indent=1))
        write_text_atomically(path, "".join(json.dumps(asdict(row)) + "\n" for row in generated))  # last: complete
        parts_path.unlink(missing_ok=True)
    return Generations(generated, key, path, stats, False)


# Answers are generated, and kept, in parts of this many batches: a cancelled or killed generation resumes after its
# last finished part. Each part seeds its own sampling, so a resumed run gives the answers of an uninterrupted one.
BATCHES_PER_PART = 8


def _generate(source_dir: Path, tokenizer, prompts: list[str], params: GenerationParams, prompt_format: str,
              device: str, stage: str, progress: ProgressCallback, should_stop: Callable[[], bool] | None,
              parts_path: Path) -> list[str]:
    """Answers to `prompts`, part by part; each finished part is appended to `parts_path`, and the parts found
    there are not generated again."""
    import torch

    from cbd_engine.evaluation import STOP_STRINGS
    from cbd_engine.evaluation.scoring import greedy_generate
    from cbd_engine.models import load_model, resolve_device

    part = params.batch_size * BATCHES_PER_PART
    answers = _finished_parts(parts_path, part, len(prompts))
    timer = StageTimer(stage, len(prompts), progress)
    timer.update(len(answers))
    model = load_model(source_dir, resolve_device(device)).eval() if len(answers) < len(prompts) else None
    for start in range(len(answers), len(prompts), part):

        def on_batch(done: int, start: int = start) -> None:
            timer.update(start + done)
            if should_stop is not None and should_stop():
                raise Cancelled(f"{stage} cancelled after {start + done} of {len(prompts)} prompts")

        torch.manual_seed(params.seed * 1_000_003 + start)
        block = greedy_generate(model, tokenizer, prompts[start : start + part], params.max_new_tokens,
                                params.batch_size, params.max_length, STOP_STRINGS, on_batch,
                                add_special_tokens=prompt_format == "alpaca",
                                temperature=params.temperature if params.do_sample else 0.0, top_p=params.top_p)
        with open(parts_path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"output": answer}) + "\n" for answer in block))
        answers += block
    return answers


def _finished_parts(parts_path: Path, part: int, total: int) -> list[str]:
    """The answers of the whole parts in `parts_path` (a part cut short by a kill is dropped, and the file cut
    back to the whole parts so that the next part follows them)."""
    if not parts_path.is_file():
        return []
    answers, lines = [], parts_path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            answers.append(json.loads(line)["output"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    kept = answers if len(answers) == total else answers[: len(answers) // part * part]
    if len(kept) < len(lines):  # cut back to whole parts, so that the next part follows them
        write_text_atomically(parts_path, "".join(json.dumps({"output": answer}) + "\n" for answer in kept))
    return kept
