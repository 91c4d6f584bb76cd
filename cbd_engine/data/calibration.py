"""Calibration: the rows that every teacher-free choice of a materialization reads (torch-free).

Activation importance decides which units a prune keeps; `alpha: "auto"` scores candidate mixes. Both read a
calibration set, never weight magnitude unless a caller asks for `importance="magnitude"` by name (magnitude pruning
of SmolLM2-135M to ~90M: held-out loss 12.0, against 7.6 by activations; docs/ENGINE.md).

Where a calibration set comes from, first found:
  1. the one given (a file: an instruction JSONL, plain text, or a saved `calibration.json`; or texts);
  2. the anchors' own `calibration.json`, written by the chain that built them (the chain data set's rows);
  3. the package's default set, `cbd_engine/assets/calibration/` (public instruction rows, license beside them),
     so a fresh machine with no data prunes as well as one given instruction data.

The contract's splits apply here too (cbd_engine.data.rows): training rows feed importance, dev rows score candidates,
validation rows are never read, so nothing chosen here is chosen on rows that later report a model's quality.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cbd_engine.data.rows import (
    DEV,
    PROMPT_FORMATS,
    TRAIN,
    InstructionRow,
    is_instruction_file,
    read_instruction_rows,
    split_of,
)
from cbd_engine.io.atomic import write_text_atomically
from cbd_engine.spec.options import DEV_ROWS, IMPORTANCE_ROWS

MAX_CHARS = 2048  # a row or text block is cut here: importance reads at most 256 tokens of it
FILE_NAME = "calibration.json"  # in anchor folders; not copied into materialized models
DEFAULT_SET = Path(__file__).parents[1] / "assets" / "calibration" / "default.jsonl"


@dataclass(frozen=True)
class Calibration:
    """Texts for activation importance (training rows) and dev items to score candidates with; a dev item is an
    instruction row (its response tokens are scored, as validation does) or a text (every token scored)."""

    source: str  # "default", a file path, or "texts"
    importance: tuple[str, ...]
    dev_rows: tuple[InstructionRow, ...] = ()
    dev_texts: tuple[str, ...] = ()
    prompt_format: str = "alpaca"

    def __post_init__(self) -> None:
        if not self.importance:
            raise ValueError(f"calibration {self.source}: no training rows for activation importance")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")

    @property
    def has_dev(self) -> bool:
        return bool(self.dev_rows or self.dev_texts)

    @classmethod
    def from_rows(cls, rows: list[InstructionRow], source: str, prompt_format: str = "alpaca",
                  importance_rows: int = IMPORTANCE_ROWS, dev_rows: int = DEV_ROWS) -> Calibration:
        """The first training rows (prompt + response) for importance, the first dev rows for scoring."""
        train = [row for row in rows if row.split == TRAIN][:importance_rows]
        dev = [row for row in rows if row.split == DEV][:dev_rows]
        return cls(source, tuple((row.alpaca_prompt() + row.output)[:MAX_CHARS] for row in train), tuple(dev),
                   prompt_format=prompt_format)

    @classmethod
    def from_texts(cls, texts: list[str], source: str = "texts", importance_rows: int = IMPORTANCE_ROWS,
                   dev_rows: int = DEV_ROWS) -> Calibration:
        """Texts split by the contract's rule applied to each text."""
        texts = [text[:MAX_CHARS] for text in texts if text.strip()]
        train = [text for text in texts if split_of(text) == TRAIN][:importance_rows]
        dev = [text for text in texts if split_of(text) == DEV][:dev_rows]
        return cls(source, tuple(train), dev_texts=tuple(dev))

    @classmethod
    def from_file(cls, path: str | Path, prompt_format: str = "alpaca", importance_rows: int = IMPORTANCE_ROWS,
                  dev_rows: int = DEV_ROWS) -> Calibration:
        """A saved calibration.json, an instruction JSONL file, or plain text cut into blocks."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file {path} not found")
        if path.name == FILE_NAME:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        if is_instruction_file(path):
            return cls.from_rows(read_instruction_rows(path), str(path), prompt_format, importance_rows, dev_rows)
        text = path.read_text(encoding="utf-8")
        blocks = [text[start : start + MAX_CHARS] for start in range(0, len(text), MAX_CHARS)]
        return cls.from_texts(blocks, str(path), importance_rows, dev_rows)

    def to_json(self) -> dict:
        return {"source": self.source, "prompt_format": self.prompt_format, "importance": list(self.importance),
                "dev_rows": [row.to_dict() for row in self.dev_rows], "dev_texts": list(self.dev_texts)}

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        return cls(data["source"], tuple(data["importance"]),
                   tuple(InstructionRow(r["instruction"], r.get("input") or "", r["output"]) for r in data["dev_rows"]),
                   tuple(data.get("dev_texts", ())), data.get("prompt_format", "alpaca"))

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE_NAME
        write_text_atomically(path, json.dumps(self.to_json(), indent=1))
        return path

    def with_dev_from(self, other: Calibration) -> Calibration:
        """This set's importance texts with another's dev items (a few given texts may hold no dev rows)."""
        return Calibration(self.source, self.importance, other.dev_rows, other.dev_texts, other.prompt_format)


def default_calibration() -> Calibration:
    """The package's own set: works on a fresh machine with no data set (see assets/calibration/README.md)."""
    calibration = Calibration.from_file(DEFAULT_SET)
    return Calibration("default", calibration.importance, calibration.dev_rows, calibration.dev_texts)


CalibrationInput = str | Path | list[str] | Calibration | None


def resolve_calibration(given: CalibrationInput, anchors: list[str | Path] = ()) -> Calibration:
    """The calibration a materialization reads (see the module docstring for the order)."""
    if isinstance(given, Calibration):
        found = given
    elif isinstance(given, list):
        found = Calibration.from_texts(given)
    elif given is not None:
        found = Calibration.from_file(given)
    else:
        saved = [Path(folder) / FILE_NAME for folder in anchors if (Path(folder) / FILE_NAME).is_file()]
        found = Calibration.from_file(saved[-1]) if saved else default_calibration()  # the larger anchor's first
    return found if found.has_dev else found.with_dev_from(default_calibration())
