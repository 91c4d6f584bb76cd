"""cbd.json, the provenance every model folder carries: how it was made, from what, with which index maps. Each
stage that writes a folder from another adds its own record under its key and keeps the records before it."""

from __future__ import annotations

import json
from pathlib import Path

LINEAGE_FILE = "cbd.json"


def read_lineage(folder: Path) -> dict:
    """A folder's cbd.json, or {} when it has none (a checkpoint from elsewhere)."""
    path = Path(folder) / LINEAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def write_lineage(source: Path, out: Path, key: str, record: dict) -> None:
    """`out`'s cbd.json: `source`'s records with `record` added (or replaced) under `key`."""
    lineage = read_lineage(source)
    lineage[key] = record
    (Path(out) / LINEAGE_FILE).write_text(json.dumps(lineage, indent=1))
