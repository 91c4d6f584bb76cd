"""The engine's cache folder and the results remembered in it (torch-free)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cbd_engine.io.atomic import write_text_atomically


def cache_dir() -> Path:
    """$CBD_CACHE_DIR, else ~/.cache/cbd: zoo models, importance, dev losses, teacher outputs, generations."""
    return Path(os.environ.get("CBD_CACHE_DIR", Path.home() / ".cache" / "cbd"))


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
