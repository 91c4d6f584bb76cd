"""Pydantic request and response schemas of the external contract (../shared/API.md). Kept apart from the ORM."""

from __future__ import annotations

from dataclasses import fields
from datetime import datetime, timezone
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, field_validator, model_validator

from cbd_engine.spec.chain import INTERPOLATION_KINDS
from cbd_engine.spec.distill_config import LOSS_BY_MODE, LOSSES, MODES, SELECT_BY, TEACHER_CACHE_TAILS, DistillConfig
from cbd_engine.spec.export import (
    DEFAULT_QUANT,
    EXPORT_FORMATS,
    GGUF_QUANTS,
    ONNX_ARCHITECTURES,
    ONNX_PRECISIONS,
    check_quant,
)
from cbd_engine.spec.fits import Budget, parse_memory
from cbd_engine.spec.options import ALPHA_MODES, DEVICES, DTYPES, INITS, MIXES
from cbd_engine.spec.shapes import PRUNE_ORDER, PRUNE_ORDERS, ShapeError, parse_size

MAX_SIZE = 10**13
MAX_MEMORY = 2**64
RECIPE = {f.name: f.default for f in fields(DistillConfig)}  # the chain recipe's defaults, shown in the API
Device = Literal[DEVICES]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JobKind = Literal["build_chain", "materialize_model", "evaluate_model", "export_model"]
ResourceStatus = Literal["queued", "running", "ready", "failed", "cancelled"]


def _rfc3339(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands times back naive; they are stored in UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


Timestamp = Annotated[datetime, PlainSerializer(_rfc3339, return_type=str)]
OptionalTimestamp = Annotated[datetime | None, PlainSerializer(_rfc3339, return_type=str | None)]


def _check_size(value: object) -> object:
    """Before pydantic's own parsing, which would take `true` for 1."""
    if value is None:
        return None
    try:
        parsed = parse_size(value)
    except ShapeError as error:
        raise ValueError(str(error)) from None
    if parsed > MAX_SIZE:
        raise ValueError(f"size must be at most {MAX_SIZE} parameters, got {value!r}")
    return value


class Strict(BaseModel):
    """Request bodies: unknown fields are errors, and no string holds a NUL byte (whatever the database)."""

    model_config = ConfigDict(extra="forbid")

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("strings may not contain NUL bytes")
        return value


class ShapeIn(Strict):
    num_layers: int = Field(ge=1, le=1024)
    hidden_size: int = Field(ge=1, le=1 << 17)
    num_heads: int = Field(ge=1, le=4096)
    num_kv_heads: int = Field(ge=1, le=4096)
    head_dim: int = Field(ge=1, le=4096)
    intermediate_size: int = Field(ge=1, le=1 << 20)
    vocab_size: int | None = Field(default=None, ge=1, le=1 << 24)
    max_position_embeddings: int | None = Field(default=None, ge=1, le=1 << 24)
    tie_word_embeddings: bool | None = None

    def as_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class AnchorIn(Strict):
    size: int | str | None = Field(default=None, description="total parameters, e.g. 90000000 or '90M'")
    checkpoint: str | None = Field(default=None, max_length=1000)
    shape: ShapeIn | None = None
    distill: bool = True

    _size = field_validator("size", mode="before")(_check_size)

    @model_validator(mode="after")
    def _one_of(self) -> AnchorIn:
        given = [name for name in ("size", "checkpoint", "shape") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"an anchor takes exactly one of size, checkpoint or shape, got {given or 'none'}")
        if not self.distill and self.checkpoint is None:
            raise ValueError("distill: false registers a checkpoint as it is, so it needs checkpoint")
        return self


class BridgeShapeIn(ShapeIn):
    family: Literal["gpt2", "llama", "gpt_neox"] = "gpt2"


class GenerationIn(Strict):
    """How the source answers the prompts (cbd_engine.pipelines.bridge.GenerationParams); null: the engine's default."""

    do_sample: bool | None = None
    temperature: float | None = Field(default=None, gt=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_new_tokens: int | None = Field(default=None, ge=1, le=131072)
    responses_per_prompt: int | None = Field(default=None, ge=1, le=100)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    batch_size: int | None = Field(default=None, ge=1, le=4096)
    max_length: int | None = Field(default=None, ge=8, le=131072)


class BridgeIn(Strict):
    model: str | BridgeShapeIn = Field(description="a checkpoint (as for source), or a shape with a family: fresh init")
    tokenizer: str | None = Field(default=None, max_length=1000,
                                  description="with a shape: a tokenizer folder (gpt2's default: GPT-2's own)")
    method: Literal["seqkd"] = "seqkd"
    num_samples: int = Field(default=1000, ge=1, le=10**7, description="training prompts the source answers")
    epochs: int = Field(default=1, ge=1, le=1000)
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    generation: GenerationIn | None = None


class DatasetIn(Strict):
    path: str | None = Field(default=None, max_length=1000)
    hf: str | None = Field(default=None, max_length=200, pattern=r"^[\w.-]+(/[\w.-]+)?$")
    split: str = Field(default="train", max_length=100, pattern=r"^[\w.\[\]:%-]+$")
    prompt_format: Literal["alpaca", "chat"] = "alpaca"
    teacher_samples: int = Field(default=0, ge=0, le=64, description="the source's answers to every training prompt "
                                 "(this many each) join the training rows; generated once and cached")

    @model_validator(mode="after")
    def _one_of(self) -> DatasetIn:
        if (self.path is None) == (self.hf is None):
            raise ValueError("dataset takes exactly one of path or hf")
        return self


class InterpolationIn(Strict):
    """Train the path between each anchor and its predecessor while the anchor is distilled (engine:
    cbd_engine.distillation.interpolation and .nested; measured in docs/RESULTS.md, "Line training", "Nested
    training")."""

    kind: Literal[INTERPOLATION_KINDS] = Field(
        default="line", description="line: the per-unit mix of the two anchors at sizes between them; nested: from "
                                    "the second anchor on, the predecessor trained with the anchor as its first "
                                    "units, so a size between is a slice (the predecessor is written again)")
    weight: float = Field(default=1.0, gt=0, le=100,
                          description="line: of the mixed model's loss, beside the anchor's own; nested: of the "
                                      "random width's")
    points: int = Field(default=4, ge=1, le=64, description="line: target sizes between the two anchors, one per step")


class DistillationIn(Strict):
    """The chain recipe's settings: values and defaults are the engine's (cbd_engine.spec.distill_config.DistillConfig),
    so the API accepts what the engine accepts."""

    loss: Literal[LOSSES] | None = Field(
        default=RECIPE["loss"], description="null: by mode (" + ", ".join(map(": ".join, LOSS_BY_MODE.items())) + ")")
    mode: Literal[MODES] = RECIPE["mode"]
    steps: int = Field(default=RECIPE["steps"], ge=1, le=10**7)
    batch_size: int = Field(default=RECIPE["batch_size"], ge=1, le=4096)
    learning_rate: float = Field(default=RECIPE["learning_rate"], gt=0, le=1)
    max_length: int = Field(default=RECIPE["max_length"], ge=8, le=131072)
    beta: float = Field(default=RECIPE["beta"], ge=0, le=1, description="jsd: the mixture weight")
    skew: float = Field(default=RECIPE["skew"], ge=0, le=1, description="skew_forward_kl / skew_reverse_kl")
    eval_every: int = Field(default=RECIPE["eval_every"], ge=0, le=10**7,
                            description="score the dev rows every N steps to keep the best (0: before and after only)")
    checkpoint_every: int = Field(default=RECIPE["checkpoint_every"], ge=0, le=10**7,
                                  description="steps between resumable checkpoints (0: none)")
    select_by: Literal[SELECT_BY] = Field(default=RECIPE["select_by"], description="what picks the kept checkpoint")
    sft_epochs: int = Field(default=0, ge=0, le=100, description="fine-tune the source on the data set first")
    prune_order: Literal[PRUNE_ORDERS] = Field(
        default=PRUNE_ORDER, description="how an anchor given by size is cut from its predecessor: the FFN first, "
                                             "or every width axis by one fraction")
    seed: int = Field(default=RECIPE["seed"], ge=0, le=2**31 - 1)
    interpolation: InterpolationIn | None = Field(
        default=None, description="null: anchors distilled alone; {kind: line} or {kind: nested}: the sizes between "
                                  "each anchor and its predecessor trained too (POST /models then materializes a "
                                  "trained path: nested pairs by slicing)")
    teacher_cache: int | None = Field(default=RECIPE["teacher_cache"], ge=1, le=4096,
                                      description="off_policy: keep the teacher's top-k per token, computed once")
    teacher_cache_tail: Literal[TEACHER_CACHE_TAILS] = Field(
        default=RECIPE["teacher_cache_tail"],
        description="teacher_cache: the teacher's mass outside its top-k as one bucket, or uniform")
    ppo_epochs: int = Field(default=RECIPE["ppo_epochs"], ge=1, le=64,
                            description="minillm: policy updates per batch of rollouts")
    ppo_clip: float = Field(default=RECIPE["ppo_clip"], gt=0, le=1, description="minillm: PPO clipping")
    teacher_mix: float = Field(default=RECIPE["teacher_mix"], ge=0, lt=1,
                               description="minillm: teacher share of the sampling mixture")


class ChainCreate(Strict):
    name: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=1000, description="Hugging Face id, local folder or .gguf file")
    bridge: BridgeIn | None = None
    anchors: list[AnchorIn] = Field(min_length=1, max_length=64)
    dataset: DatasetIn | None = None
    distillation: DistillationIn = Field(default_factory=DistillationIn)
    device: Device = "auto"


class HealIn(Strict):
    steps: Annotated[int, Field(strict=True, ge=1, le=100_000)] = Field(
        description="distillation steps from the larger anchor on the chain's data set")
    learning_rate: Annotated[float, Field(strict=True, gt=0, le=1)] | None = Field(
        default=None, description="null: the chain's distillation learning rate")


class FitsIn(Strict):
    """A memory budget: the largest model of the chain whose export plus KV cache fits (cbd_engine/spec/fits.py)."""

    memory: int | str = Field(description="bytes: an integer, or a number with a unit: '300MB' (MB = 10^6 bytes; "
                                          "also B, KB, GB, TB), '1.5GiB' (GiB = 2^30 bytes; also KiB, MiB, TiB)")
    format: Literal[EXPORT_FORMATS] = Field(default="gguf", description="the export counted (and made): gguf only "
                                                                        "for now")
    quant: str = Field(default=DEFAULT_QUANT["gguf"], max_length=10,
                       description="as for exports: F16, Q8_0, Q6_K, Q4_K or Q4_0")
    context: int = Field(default=2048, ge=1, le=1 << 20, description="tokens the KV cache (F16, as llama.cpp's "
                                                                     "default) holds")
    round_to_blocks: bool = Field(default=False,
                                  description="hidden and FFN widths in whole quantization blocks (32 weights; 256 "
                                              "for K-quants), so that no tensor falls back to a wider type")

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, value: object) -> object:
        try:
            parsed = parse_memory(value)
        except ShapeError as error:
            raise ValueError(str(error)) from None
        if parsed > MAX_MEMORY:
            raise ValueError(f"memory must be at most {MAX_MEMORY} bytes (16 EiB), got {value!r}")
        return value

    @model_validator(mode="after")
    def _counted(self) -> FitsIn:
        self.budget()
        return self

    def budget(self) -> Budget:
        try:
            return Budget(parse_memory(self.memory), self.format, self.quant, self.context, self.round_to_blocks)
        except ValueError as error:  # ShapeError, and check_quant's
            raise ValueError(str(error)) from None


class ModelCreate(Strict):
    source: str | None = Field(default=None, min_length=1, max_length=1000)
    chain: str | None = Field(default=None, min_length=1, max_length=40)
    size: int | str | None = Field(default=None, description="total parameters, e.g. 100000000 or '100M'")
    shape: ShapeIn | None = None
    fits: FitsIn | None = Field(default=None, description="instead of size or shape: the largest model whose "
                                                          "export plus KV cache fits a memory budget; the export is "
                                                          "made when the model is")
    alpha: Annotated[float, Field(strict=True, ge=0, le=1)] | Literal[ALPHA_MODES] | None = Field(
        default="auto", description="the smaller anchor's weight: 'auto' (null too: chosen on the chain's dev rows), "
                                    "'proportional' (by parameter count) or a number in [0, 1]")
    mix: Literal[MIXES] = Field(default="unit", description="unit: alpha mixes the units both anchors have; paper: "
                                                             "Eq. 3 over the expanded and the pruned anchor")
    heal: HealIn | None = Field(default=None, description="null: teacher-free; or distill the model from the larger "
                                                          "anchor for `steps` steps after materializing it")
    init: Literal[INITS] = "cbd"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    dtype: Literal[DTYPES] = "bfloat16"
    device: Device = "auto"

    _size = field_validator("size", mode="before")(_check_size)

    @field_validator("alpha", mode="before")
    @classmethod
    def _alpha(cls, value: object) -> object:
        """One message for every wrong alpha (a boolean is not a number here)."""
        if value is None or (isinstance(value, str) and value in ALPHA_MODES):
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"alpha must be 'auto' (the default), 'proportional' or a number in [0, 1], "
                             f"got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_of(self) -> ModelCreate:
        if (self.source is None) == (self.chain is None):
            raise ValueError("give exactly one of source or chain")
        given = [name for name in ("size", "shape", "fits") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of size, shape or fits, got {given or 'none'}")
        return self


class EvaluationCreate(Strict):
    tasks: list[Annotated[str, Field(min_length=1, max_length=1100)]] = Field(
        min_length=1, max_length=16,
        description="as `cbd eval`: TYPE=PATH (perplexity, response_loss, rougeL, summarization, multiple_choice; "
                    "PATH under the allowed roots), or validation_loss (the chain data set's validation rows)")
    limit: int | None = Field(default=None, ge=1, le=100000)
    device: Device = "auto"


class JobRef(BaseModel):
    id: str
    url: str


class FileOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class AnchorOut(BaseModel):
    id: str
    index: int
    params: int
    shape: dict[str, Any]
    status: ResourceStatus
    metrics: dict[str, Any]
    files: list[FileOut]


class ChainAccepted(BaseModel):
    id: str
    name: str
    status: ResourceStatus
    job: JobRef


class ChainOut(BaseModel):
    id: str
    name: str
    source: str
    family: str | None
    status: ResourceStatus
    anchors: list[AnchorOut]
    job: JobRef | None
    created_at: Timestamp


class ModelOut(BaseModel):
    id: str
    chain: str
    source: str
    size: int | None
    params: int
    shape: dict[str, Any]
    alpha: float | str | None = Field(description="the smaller anchor's weight used; until the model is made, the "
                                                "request ('auto', 'proportional')")
    alpha_request: float | str = Field(description="alpha as requested: 'auto', 'proportional' or the number")
    mix: str
    heal: HealIn | None
    init: str
    seed: int
    dtype: str
    engine_version: str
    anchors: list[str]
    status: ResourceStatus
    metrics: dict[str, Any]
    files: list[FileOut]
    provenance: dict[str, Any]
    job: JobRef | None
    hub_repo_id: str
    aliases: list[str] = Field(description="names that point at this model; each is the Hub repository cbd/<alias>")
    tags: list[str]
    created_at: Timestamp
    fits: FitsOut | None = Field(default=None, description="in the answer to a POST /models with fits: its "
                                                           "arithmetic and the export it queued (null elsewhere)")


class ModelRef(BaseModel):
    id: str
    status: ResourceStatus
    url: str


class ModelPlan(BaseModel):
    """What POST /models would make for this body, without making it."""

    chain: str
    anchors: list[str] = Field(description="the smaller and the larger bracketing anchor")
    size: int | None = Field(description="the size requested (null for a shape)")
    params: int = Field(description="the exact parameter count of the shape")
    shape: dict[str, Any]
    queue: str
    estimated_seconds: float
    existing: ModelRef | None = Field(description="an identical model: POST /models answers 200 with it")
    fits: FitsOut | None = Field(default=None, description="with fits: the arithmetic")


class SignedLinks(BaseModel):
    expires_at: Timestamp
    files: list[FileOut] = Field(description="each url works without a bearer header until expires_at")


class AliasOut(BaseModel):
    name: str
    model: str = Field(description="the model it points at")
    hub_repo_id: str = Field(description="cbd/<name>: the Hub repository that serves the files (and commit id) of "
                                         "the model it points at now; cbd/<name>-GGUF its exports")
    previous: str | None = Field(description="the model it pointed at before its last move (null: never moved)")
    updated_by: str
    updated_at: Timestamp


class ExportCreate(Strict):
    format: Literal[EXPORT_FORMATS] = Field(
        default="gguf", description="gguf: one file for llama.cpp, ollama, LM Studio (every family); onnx: a folder "
                                    f"for ONNX Runtime GenAI (the Llama family: {', '.join(ONNX_ARCHITECTURES)})")
    quant: Literal[GGUF_QUANTS + ONNX_PRECISIONS] | None = Field(
        default=None, description="gguf: F16; Q8_0 (default) and Q4_0 (blocks of 32 weights); Q6_K and Q4_K "
                                  "(super-blocks of 256, made by llama.cpp's own quantizer). Rows that are not "
                                  "whole blocks fall back as llama.cpp does (Q4_K to Q5_0, Q6_K to Q8_0, then "
                                  "F16); 4-bit files keep the vocabulary at Q6_K. onnx: its precision")
    precision: Literal[ONNX_PRECISIONS] | None = Field(
        default=None, description="onnx: fp32 (default) or int4 (4-bit weights in blocks of 32, CPU); the same as "
                                  "quant for onnx, give one of them")
    device: Device = "auto"

    @model_validator(mode="after")
    def _quant_of_format(self) -> ExportCreate:
        """One name for the quantization from here on: `quant` (ONNX's precision is its quant)."""
        if self.precision is not None:
            if self.format != "onnx":
                raise ValueError(f"precision is for onnx exports; a {self.format} export takes quant")
            if self.quant not in (None, self.precision):
                raise ValueError(f"precision {self.precision!r} and quant {self.quant!r} differ: give one")
            self.quant, self.precision = self.precision, None
        self.quant = self.quant or DEFAULT_QUANT[self.format]
        check_quant(self.format, self.quant)
        return self


class ExportOut(BaseModel):
    id: str
    model: str
    format: str
    quant: str = Field(description="the GGUF quantization, or the ONNX precision")
    status: ResourceStatus
    metrics: dict[str, Any] = Field(description="validation_loss measured by loading the export in its runtime "
                                                "(llama.cpp, onnxruntime-genai), beside the model's own; size_bytes "
                                                "(all its files); samples; fits: the budget arithmetic of the fits "
                                                "request that queued it")
    files: list[FileOut]
    hub_repo_id: str = Field(description="the sibling repository that serves every export of the model")
    job: JobRef | None = Field(description="null while the export waits for its model (a fits request)")
    created_at: Timestamp


class FitsLarger(BaseModel):
    params: int
    shape: dict[str, Any]
    total_bytes: int = Field(description="more than the budget")


class FitsOut(BaseModel):
    """The arithmetic of a fits request: the chosen shape's file (tensor data by type, the rest of the file) and KV
    cache against the budget, and the next larger shape, which does not fit."""

    memory: int = Field(description="the budget, bytes")
    format: str
    quant: str
    context: int
    round_to_blocks: bool
    params: int
    weights_bytes: int = Field(description="the tensors' data")
    weights_by_type: dict[str, dict[str, int]] = Field(
        description="params and bytes per GGUF tensor type: norms and biases F32; F16 in a quantized file marks "
                    "tensors whose rows are not whole blocks; Q4_0 keeps the embedding at Q8_0")
    fallback_params: int = Field(description="parameters that stay F16 in a quantized file")
    overhead_bytes: int = Field(description="header, metadata (the tokenizer counted exactly), tensor index and "
                                            "alignment: an upper bound, tens of KB over (SmolLM2: 75 KB)")
    file_bytes: int = Field(description="weights_bytes + overhead_bytes: at least the export's size")
    kv_cache_bytes: int = Field(description="2 x layers x cells x kv_heads x head_dim x 2 bytes (F16; cells: the "
                                            "context rounded up to a multiple of 256, as llama.cpp allocates)")
    total_bytes: int = Field(description="file_bytes + kv_cache_bytes, at most memory")
    next_larger: FitsLarger | None = Field(description="the next larger shape of the chain, over the budget; "
                                                       "null at the chain's largest model")
    note: str | None = Field(default=None, description="why the answer is the chain's largest model")
    export: ExportOut | None = Field(default=None, description="the export made with the model (POST /models)")


class Progress(BaseModel):
    stage: str | None = None
    step: int | None = None
    total: int | None = None
    fraction: float | None = None
    eta_seconds: float | None = None
    loss: float | None = None
    estimated_seconds: float | None = None


class JobResult(BaseModel):
    chain: str | None = None
    model: str | None = None
    export: str | None = None
    warnings: list[str] = Field(default_factory=list, description="what a user should know about the result, in "
                                                                   "words (e.g. a model worse than uniform guessing)")


class JobOut(BaseModel):
    id: str
    kind: JobKind
    status: JobStatus
    queue: str
    progress: Progress
    error: str | None
    result: JobResult
    attempts: int
    created_at: Timestamp
    started_at: OptionalTimestamp
    finished_at: OptionalTimestamp


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    next_page_token: str | None


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    errors: list[dict[str, Any]] | None = None


class HubSibling(BaseModel):
    rfilename: str
    size: int | None = None


class HubModelInfo(BaseModel):
    id: str
    modelId: str  # noqa: N815 - the Hub's field name
    sha: str
    private: bool = False
    disabled: bool = False
    gated: bool = False
    downloads: int = 0
    likes: int = 0
    tags: list[str]
    siblings: list[HubSibling]
    createdAt: Timestamp  # noqa: N815
    lastModified: Timestamp  # noqa: N815


class HubRef(BaseModel):
    name: str
    ref: str
    targetCommit: str  # noqa: N815 - the Hub's field name


class HubRefs(BaseModel):
    branches: list[HubRef]
    converts: list[HubRef] = Field(default_factory=list)
    tags: list[HubRef] = Field(default_factory=list)


class HubLfs(BaseModel):
    oid: str
    size: int
    pointerSize: int = 134  # noqa: N815


class HubTreeEntry(BaseModel):
    type: Literal["file", "directory"] = "file"
    path: str
    size: int
    oid: str
    lfs: HubLfs | None = None


