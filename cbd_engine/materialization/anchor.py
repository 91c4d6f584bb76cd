"""An anchor (a model folder the materializer reads) and a term: one anchor with the plan that transforms it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from cbd_engine.io.checkpoint import SafetensorsReader, folder_hashes
from cbd_engine.materialization.transforms import Plan, presence, transform_tensor
from cbd_engine.spec.families import ModelSpec, TensorSpec, read_config
from cbd_engine.spec.shapes import Shape


@dataclass
class Anchor:
    path: Path
    spec: ModelSpec

    @classmethod
    def load(cls, path: str | Path) -> Anchor:
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"anchor {path} is not a folder")
        return cls(path, ModelSpec.from_config(read_config(path)))

    @cached_property
    def reader(self) -> SafetensorsReader:
        return SafetensorsReader(self.path)

    @property
    def shape(self) -> Shape:
        return self.spec.shape

    @property
    def params(self) -> int:
        return self.spec.num_params

    @cached_property
    def provenance(self) -> dict:
        path = self.path / "cbd.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": folder_hashes(self.path), "shape": self.shape.to_dict(),
                "params": self.params}


@dataclass
class Term:
    """One anchor and the plan that transforms it to the target shape."""

    anchor: Anchor
    plan: Plan

    def tensor(self, spec: TensorSpec, name: str, layer_index: int | None, seed: int,
               rows: tuple[int, int] | None = None, rescale_gains: bool = True) -> torch.Tensor:
        """The target tensor `name` (rows `rows` of it, for vocabulary-sized ones): float32 where the plan adds
        units, else in the anchor's own dtype (the same values; transform_tensor)."""
        layer = self.plan.layers[layer_index] if layer_index is not None else None
        source = spec.name.format(layer=layer.source) if layer is not None else spec.name
        tensor = self.anchor.reader.read(source, rows)
        return transform_tensor(tensor, spec, name, self.plan, layer, self.anchor.shape,
                                self.anchor.spec.architecture.norm, seed, rescale_gains)

    def presence(self, shape: torch.Size, spec: TensorSpec, layer_index: int | None) -> torch.Tensor:
        """Which entries of the transformed tensor hold this anchor's own weights (transforms.presence)."""
        layer = self.plan.layers[layer_index] if layer_index is not None else None
        return presence(shape, spec, self.plan, layer, self.anchor.shape)
