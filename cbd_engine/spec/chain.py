"""A POST /chains body, checked (torch-free: the service validates requests without torch): the anchors, the data
set, the distillation settings with the recipe's defaults, the bridge. The build itself is pipelines/chain.py."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from cbd_engine.spec.bridge import BridgeSpec
from cbd_engine.spec.distill_config import DistillConfig
from cbd_engine.spec.shapes import PRUNE_ORDER, PRUNE_ORDERS, parse_size

SFT_LEARNING_RATE = 1e-5  # the paper's fine-tuning rate (appendix B)
CHAIN_ONLY_KEYS = ("sft_epochs", "sft_learning_rate", "prune_order", "interpolation")  # beside DistillConfig's
INTERPOLATION_KINDS = ("line", "nested")  # distillation/interpolation.py, distillation/nested.py


@dataclass(frozen=True)
class InterpolationSpec:
    """`distillation.interpolation`: train the path between each anchor and its predecessor while the anchor is
    distilled (cbd_engine.distillation.interpolation). Off unless given: measured in docs/RESULTS.md."""

    kind: str = "line"
    weight: float = 1.0  # line: of the mixed model's loss beside the anchor's own (1); nested: of the random width's
    points: int = 4  # line: target shapes at the parameter fractions (2k + 1) / (2 points) between the anchors

    @classmethod
    def parse(cls, data: dict) -> InterpolationSpec:
        if not isinstance(data, dict):
            raise ValueError('distillation.interpolation must be an object, e.g. {"kind": "line", "weight": 1}')
        unknown = sorted(set(data) - {"kind", "weight", "points"})
        if unknown:
            raise ValueError(f"distillation.interpolation has unknown fields {unknown}; allowed: kind, weight, points")
        spec = cls(**data)
        if spec.kind not in INTERPOLATION_KINDS:
            raise ValueError(f"distillation.interpolation.kind must be one of {', '.join(INTERPOLATION_KINDS)}, "
                             f"got {spec.kind!r}")
        if isinstance(spec.weight, bool) or not isinstance(spec.weight, int | float) or not 0 < spec.weight <= 100:
            raise ValueError(f"distillation.interpolation.weight must be a number in (0, 100], got {spec.weight!r}")
        if isinstance(spec.points, bool) or not isinstance(spec.points, int) or not 1 <= spec.points <= 64:
            raise ValueError(f"distillation.interpolation.points must be a whole number in [1, 64], "
                             f"got {spec.points!r}")
        return spec

    def fractions(self) -> list[float]:
        """Where the targets sit between the smaller (0) and the larger (1) anchor, in parameters."""
        return [(2 * k + 1) / (2 * self.points) for k in range(self.points)]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AnchorSpec:
    size: int | None = None
    shape: dict | None = None
    checkpoint: str | None = None
    distill: bool = True

    @classmethod
    def parse(cls, index: int, data: dict) -> AnchorSpec:
        where = f"anchors[{index}]"
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object with one of size, shape, checkpoint")
        unknown = sorted(set(data) - {"size", "shape", "checkpoint", "distill"})
        if unknown:
            raise ValueError(f"{where} has unknown fields {unknown}; allowed: size, shape, checkpoint, distill")
        given = [key for key in ("size", "shape", "checkpoint") if data.get(key) is not None]
        if len(given) != 1:
            raise ValueError(f"{where} needs exactly one of size, shape, checkpoint (got {given or 'none'})")
        distill = bool(data.get("distill", True))
        if not distill and "checkpoint" not in given:
            raise ValueError(f"{where}.distill=false only registers a checkpoint; a size or shape must be distilled")
        size = parse_size(data["size"]) if "size" in given else None
        return cls(size, data.get("shape"), data.get("checkpoint"), distill)


@dataclass(frozen=True)
class ChainSpec:
    source: str
    anchors: list[AnchorSpec]
    dataset: dict
    distillation: dict  # every DistillConfig field
    sft_epochs: float
    sft_learning_rate: float
    bridge: BridgeSpec | None = None  # a SeqKD bridge replaces the source as anchor 0
    prune_order: str = PRUNE_ORDER  # how an anchor given by size is cut from its predecessor (shapes.PRUNE_ORDERS)
    interpolation: InterpolationSpec | None = None  # line training between each pruned anchor and its predecessor


def distillation_settings(spec: dict) -> dict:
    """Every DistillConfig setting of a POST /chains body, the recipe's defaults filled in (torch-free; no data set
    needed: a registered chain's models heal with these)."""
    given = {key: value for key, value in (spec.get("distillation") or {}).items()
             if value is not None and key not in CHAIN_ONLY_KEYS}
    if spec.get("device"):
        given["device"] = spec["device"]
    given.setdefault("prompt_format", (spec.get("dataset") or {}).get("prompt_format", "alpaca"))
    return asdict(DistillConfig.from_dict(given))


def parse_spec(spec: dict) -> ChainSpec:
    """Check a POST /chains body; every error names the field."""
    if not isinstance(spec, dict):
        raise ValueError("the chain spec must be a JSON object")
    if not spec.get("source"):
        raise ValueError("source is required: a Hugging Face id, a local model folder or a .gguf file")
    anchors = spec.get("anchors")
    if not isinstance(anchors, list) or not anchors:
        raise ValueError("anchors must be a non-empty list")
    dataset = spec.get("dataset") or {}
    if not (dataset.get("path") or dataset.get("hf")):
        raise ValueError("dataset needs path (JSONL or text file) or hf (a data set id)")
    samples = dataset.get("teacher_samples") or 0
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"dataset.teacher_samples must be a whole number >= 0, got {samples!r}")
    if samples and spec.get("bridge") is not None:
        raise ValueError("dataset.teacher_samples: a bridge trains on the source's answers already")
    distillation = distillation_settings(spec)
    chain_only = {key: value for key, value in (spec.get("distillation") or {}).items()
                  if key in CHAIN_ONLY_KEYS and value is not None}
    sft_epochs = float(chain_only.get("sft_epochs", 0) or 0)
    if sft_epochs < 0:
        raise ValueError(f"distillation.sft_epochs must be >= 0, got {sft_epochs}")
    bridge = BridgeSpec.parse(spec["bridge"], distillation["max_length"]) if spec.get("bridge") is not None else None
    if bridge is not None and sft_epochs:
        raise ValueError("distillation.sft_epochs fine-tunes the source, which the bridge replaces as anchor 0: "
                         "fine-tune the source beforehand (as appendix B does) and give sft_epochs 0")
    prune_order = chain_only.get("prune_order", PRUNE_ORDER)
    if prune_order not in PRUNE_ORDERS:
        raise ValueError(f"distillation.prune_order must be one of {', '.join(PRUNE_ORDERS)}, got {prune_order!r}")
    interpolation = chain_only.get("interpolation")
    return ChainSpec(str(spec["source"]), [AnchorSpec.parse(i, a) for i, a in enumerate(anchors)], dataset,
                     distillation, sft_epochs, float(chain_only.get("sft_learning_rate", SFT_LEARNING_RATE)), bridge,
                     prune_order, InterpolationSpec.parse(interpolation) if interpolation is not None else None)


