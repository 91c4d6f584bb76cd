"""Small file writes that must never be seen half-done (torch-free)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file beside it (named by process, so concurrent writers do not share one)
    and a rename: readers see the old content or the new, never a part."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def cached_json(cache_dir: Path, kind: str, key: object, compute: Callable[[], Any]) -> Any:
    """compute(), remembered as JSON in `cache_dir` under a hash of (kind, key): for results that are a pure function
    of their key (an anchor's weights and a calibration set) and cost a forward pass. An unreadable or unwritable
    cache only costs the computation again."""
    digest = hashlib.sha256(json.dumps([kind, key], sort_keys=True).encode()).hexdigest()
    path = Path(cache_dir) / f"{kind}-{digest[:32]}.json"
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads(path.read_text(encoding="utf-8"))
    value = compute()
    with contextlib.suppress(OSError):
        write_text_atomically(path, json.dumps(value))
    return value
