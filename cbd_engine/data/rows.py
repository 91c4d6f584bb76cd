"""Instruction and text data: reading, the paper's prompt template, and the contract's three splits.

Torch-free. Tokenization and batching for training live with the distillation code.

Splits (the contract's hash rule, on sha256 of `instruction + "\n" + input`, or of a text block, read as an integer):
0 mod 10 is validation (only reported), 1 mod 10 is dev (every choice: checkpoints, alpha, shapes), the rest trains.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_FORMATS = ("alpaca", "chat")
TRAIN, DEV, VALIDATION = "train", "dev", "validation"


def split_of(key: str) -> str:
    """The contract's rule: sha256(key) as an integer, 0 mod 10 validation, 1 mod 10 dev, otherwise train."""
    remainder = int(hashlib.sha256(key.encode()).hexdigest(), 16) % 10
    return VALIDATION if remainder == 0 else DEV if remainder == 1 else TRAIN


@dataclass(frozen=True)
class Splits:
    """Rows (or encoded examples) of one data set by split: train is trained on, dev picks, validation reports."""

    train: list[Any]
    dev: list[Any]
    validation: list[Any]


@dataclass(frozen=True)
class InstructionRow:
    instruction: str
    input: str
    output: str

    @property
    def split(self) -> str:
        return split_of(f"{self.instruction}\n{self.input}")

    def to_dict(self) -> dict[str, str]:
        return {"instruction": self.instruction, "input": self.input, "output": self.output}

    def alpaca_prompt(self) -> str:
        template = ALPACA_PROMPT_WITH_INPUT if self.input else ALPACA_PROMPT
        return template.format(instruction=self.instruction, input=self.input)


def read_instruction_rows(path: str | Path) -> list[InstructionRow]:
    """Rows of an instruction JSONL file (`instruction`, `input`, `output`); a clear error names a bad line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append(InstructionRow(record["instruction"], record.get("input") or "", record["output"]))
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise ValueError(f"{path}:{number}: not an instruction row with instruction/output ({error})") from None
    return rows


def split_rows(rows: list[InstructionRow]) -> Splits:
    """The rows by the contract's hash rule, each split in file order."""
    return Splits(*([row for row in rows if row.split == name] for name in (TRAIN, DEV, VALIDATION)))


def is_instruction_file(path: str | Path) -> bool:
    return Path(path).suffix in (".jsonl", ".json")


# --- Added for the distillation engine: Hugging Face data sets and plain text -------------------------------------

# Column names of common instruction data sets, mapped onto (instruction, input, output).
HF_COLUMNS = (
    ("instruction", "input", "output"),  # Alpaca and its copies
    ("instruction", "context", "response"),  # databricks-dolly-15k
    ("prompt", None, "completion"),
    ("question", None, "answer"),
)


def rows_from_records(records: list[dict], source: str = "data set") -> list[InstructionRow]:
    """InstructionRows from dicts whose columns follow one of HF_COLUMNS; a clear error names what was found."""
    if not records:
        return []
    keys = set(records[0])
    for instruction, context, output in HF_COLUMNS:
        if instruction in keys and output in keys:
            return [
                InstructionRow(str(r[instruction]), str(r.get(context) or "") if context else "", str(r[output]))
                for r in records
            ]
    raise ValueError(f"{source}: no instruction/response columns among {sorted(keys)}; expected one of {HF_COLUMNS}")


def read_hf_rows(dataset_id: str, split: str = "train") -> list[InstructionRow]:
    """Rows of a Hugging Face data set: a hub id, a local folder of data files (JSON lines, CSV, Parquet; splits
    named by the files, as `datasets.load_dataset` reads them) or a folder written by `save_to_disk`. Needs the
    optional `datasets` package (`pip install 'cbd-factory[data]'`); a data set that cannot be read is a ValueError
    naming it."""
    try:
        import datasets
    except ImportError:
        raise ValueError(f"dataset.hf={dataset_id!r} needs the `datasets` package: pip install datasets") from None
    try:
        if _is_saved_to_disk(Path(dataset_id)):
            table = datasets.load_from_disk(dataset_id)
            table = table[split] if isinstance(table, datasets.DatasetDict) else table
        else:
            table = datasets.load_dataset(dataset_id, split=split)
    except (OSError, ValueError, KeyError) as error:  # not found, offline hub, unknown split
        raise ValueError(f"dataset.hf={dataset_id!r} split {split!r} cannot be read: {error}") from None
    return rows_from_records(list(table), source=f"{dataset_id}[{split}]")


def _is_saved_to_disk(folder: Path) -> bool:
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def read_dataset_spec(dataset: dict) -> tuple[list[InstructionRow] | None, str | None]:
    """The POST /chains `dataset` object -> (instruction rows, None) or (None, plain text) for a text file."""
    if dataset.get("hf"):
        return read_hf_rows(dataset["hf"], dataset.get("split") or "train"), None
    path = dataset.get("path")
    if not path:
        raise ValueError("dataset needs `path` (a JSONL or text file) or `hf` (a data set id)")
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset.path {path} does not exist")
    if is_instruction_file(path):
        return read_instruction_rows(path), None
    return None, Path(path).read_text(encoding="utf-8")
