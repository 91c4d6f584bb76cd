"""What a request's `source` may name, torch-free: a local folder, a .gguf file, a Hugging Face id, or a model of
the zoo (checkpoints that ship offline, by "zoo:<name>" or their Hub id). Fetching is io/zoo.py and io/sources.py;
the registry is here because the service's estimates need a zoo model's size before anything is fetched."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooModel:
    """A model that ships offline: its name, its Hub id (a request naming it needs no Hub) and its parameter count
    (estimates before it is fetched)."""

    name: str
    hub_id: str
    params: int


SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
ZOO_MODELS = {"smollm2-135m-instruct": ZooModel("smollm2-135m-instruct", SMOLLM2_ID, 134_515_008)}


def zoo_entry(source: str) -> ZooModel | None:
    """The zoo model a source names, as "zoo:<name>" or by its Hub id; None for any other source."""
    if source.startswith("zoo:"):
        name = source.removeprefix("zoo:")
        if name not in ZOO_MODELS:
            raise ValueError(f"unknown zoo model {name!r}; known: {', '.join(ZOO_MODELS)}")
        return ZOO_MODELS[name]
    return next((model for model in ZOO_MODELS.values() if model.hub_id == source), None)
