"""Writes that are never seen half-done (torch-free), one rule for files and folders alike: write beside the target
under a temporary name, then rename over it. A reader sees the old content or the new, never a part; a kill leaves
at most a temporary file or folder beside the target, never a broken target."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def write_text_atomically(path: Path, text: str) -> None:
    """Write `path` through a temporary file beside it (named by process, so concurrent writers do not share one)
    and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


@contextlib.contextmanager
def atomic_output_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write (a file too large to hold in memory: a GGUF export), renamed
    to `path` on success and removed on any error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `out`, moved to `out` on success and removed on any error. `out` must be
    absent or empty unless `replace` (a checkpoint saved over the last one): then the old folder is swapped out
    as `out.old` first, so a kill at any moment leaves `out` or `out.old` whole (old_version)."""
    out = Path(out)
    if not replace and out.exists() and any(out.iterdir()):
        raise FileExistsError(f"output folder {out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        old = old_version(out)
        if out.exists():
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def old_version(out: Path) -> Path:
    """Where atomic_output_dir(out, replace=True) keeps the previous folder while it swaps the new one in."""
    return out.with_name(out.name + ".old")
