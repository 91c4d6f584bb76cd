"""The SeqKD bridge (paper section 3.1, scenario 2; appendix B): a source of another architecture or vocabulary is
first distilled into a bridge model of the chain's architecture by sequence-level KD, and the bridge is anchor zero.

  1. the source answers the data set's prompts (batched; sampling parameters recorded); the answers are cached by
     (source weights, prompt texts, parameters), so a second chain from the same source reuses them, and kept part
     by part while they are generated, so an interrupted generation resumes
  2. the bridge starts from a checkpoint (as the paper's GPT2-XL) or, for a shape of a family, from a fresh init,
     with its own tokenizer (a gpt2 shape: GPT-2's, from `zoo.gpt2_tokenizer`)
  3. the bridge is fine-tuned with plain cross-entropy on the source's answers encoded with its own tokenizer, and
     validated on the source's answers to the validation rows' prompts (chain.py runs this stage)

The request's `bridge` object is checked in spec/bridge.py (torch-free).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from cbd_engine.data.batches import format_prompt, pad_id_of
from cbd_engine.data.rows import InstructionRow, read_instruction_rows
from cbd_engine.evaluation import STOP_STRINGS
from cbd_engine.evaluation.scoring import greedy_generate
from cbd_engine.io.atomic import atomic_output_dir, write_text_atomically
from cbd_engine.io.cache import cache_dir
from cbd_engine.io.checkpoint import copy_side_files, folder_hashes
from cbd_engine.io.zoo import gpt2_tokenizer
from cbd_engine.nn.device import resolve_device
from cbd_engine.nn.loading import load_model, load_tokenizer
from cbd_engine.spec.bridge import BridgeSpec, GenerationParams, bridge_config
from cbd_engine.spec.progress import Cancelled, ProgressCallback, StageTimer, no_progress


def default_tokenizer(bridge: BridgeSpec) -> Path:
    """The fresh bridge's tokenizer folder: the given one, else (a gpt2 shape) GPT-2's own."""
    if bridge.tokenizer:
        return Path(bridge.tokenizer)
    return gpt2_tokenizer()


def init_bridge(bridge: BridgeSpec, out: Path, seed: int) -> Path:
    """A fresh model of the bridge's shape (seeded) with its tokenizer, written atomically to `out`."""
    tokenizer_dir = default_tokenizer(bridge)
    tokenizer = load_tokenizer(tokenizer_dir)
    config = bridge_config(bridge.model, len(tokenizer))
    eos = tokenizer.eos_token_id
    special = {"bos_token_id": tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos,
               "eos_token_id": eos, "pad_token_id": pad_id_of(tokenizer)}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config, **special))
    with atomic_output_dir(out) as tmp:
        model.save_pretrained(tmp)
        copy_side_files(tokenizer_dir, tmp)
        (tmp / "cbd.json").write_text(json.dumps({"bridge_init": {"shape": bridge.model, "seed": seed,
                                                                  "tokenizer": str(tokenizer_dir)}}, indent=1))
    return out


# --- the source's answers, cached -----------------------------------------------------------------------------------


def generation_cache_dir() -> Path:
    """Where answers are cached: $CBD_GENERATIONS_DIR, else `generations` in the engine's cache (~/.cache/cbd)."""
    return Path(os.environ.get("CBD_GENERATIONS_DIR") or cache_dir() / "generations")


@dataclass
class Generations:
    rows: list[InstructionRow]  # the asked rows, each `responses_per_prompt` times, the source's answer as output
    key: str  # sha256 of (source weights, prompt texts, parameters)
    path: Path  # the cached JSONL (instruction, input, output): readable as an instruction data set
    stats: dict  # of the run that generated them: prompts, responses, response_tokens, seconds, device
    cached: bool  # read from the cache, nothing generated


def generation_key(weight_hashes: dict[str, str], prompts: list[str], params: GenerationParams) -> str:
    payload = {"source_weights": weight_hashes, "prompts": prompts, "params": asdict(params)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def generate_responses(source_dir: Path, rows: list[InstructionRow], params: GenerationParams, cache_dir: Path,
                       prompt_format: str = "alpaca", *, device: str = "auto", stage: str = "generate",
                       progress: ProgressCallback = no_progress, should_stop: Callable[[], bool] | None = None,
                       ) -> Generations:
    """The source's answers to the prompts of `rows` (`params.responses_per_prompt` each, cut at EOS or "###"),
    read from `cache_dir` when the same source answered the same prompts with the same parameters before. An
    interrupted generation resumes after its last finished part; a second process asking for the same answers
    waits for the first (a lock per key) and reads them."""
    if not rows:
        raise ValueError("the source has no prompts to answer")
    tokenizer = load_tokenizer(source_dir)
    asked = [row for row in rows for _ in range(params.responses_per_prompt)]
    prompts = [format_prompt(tokenizer, row, prompt_format)[0] for row in asked]
    key = generation_key(folder_hashes(source_dir), prompts, params)
    cache_dir = Path(cache_dir)
    path, meta_path, parts_path = (cache_dir / f"{key}{suffix}" for suffix in (".jsonl", ".json", ".parts.jsonl"))
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when the process dies
        if path.is_file() and meta_path.is_file():
            stats = json.loads(meta_path.read_text())["stats"]
            return Generations(read_instruction_rows(path), key, path, stats, True)
        started = time.monotonic()
        answers = _generate(source_dir, tokenizer, prompts, params, prompt_format, device, stage, progress,
                            should_stop, parts_path)
        response_tokens = sum(len(ids) for ids in tokenizer(answers, add_special_tokens=False)["input_ids"])
        stats = {"prompts": len(rows), "responses": len(asked), "response_tokens": response_tokens,
                 "seconds": round(time.monotonic() - started, 2), "device": str(resolve_device(device))}
        generated = [InstructionRow(row.instruction, row.input, answer)
                     for row, answer in zip(asked, answers, strict=True)]
        meta = {"source": str(source_dir), "prompt_format": prompt_format, "params": asdict(params), "stats": stats}
        write_text_atomically(meta_path, json.dumps(meta, indent=1))
        write_text_atomically(path, "".join(json.dumps(asdict(row)) + "\n" for row in generated))  # last: complete
        parts_path.unlink(missing_ok=True)
    return Generations(generated, key, path, stats, False)


# Answers are generated, and kept, in parts of this many batches: a cancelled or killed generation resumes after its
# last finished part. Each part seeds its own sampling, so a resumed run gives the answers of an uninterrupted one.
BATCHES_PER_PART = 8


def _generate(source_dir: Path, tokenizer, prompts: list[str], params: GenerationParams, prompt_format: str,
              device: str, stage: str, progress: ProgressCallback, should_stop: Callable[[], bool] | None,
              parts_path: Path) -> list[str]:
    """Answers to `prompts`, part by part; each finished part is appended to `parts_path`, and the parts found
    there are not generated again."""
    part = params.batch_size * BATCHES_PER_PART
    answers = _finished_parts(parts_path, part, len(prompts))
    timer = StageTimer(stage, len(prompts), progress)
    timer.update(len(answers))
    model = load_model(source_dir, resolve_device(device)).eval() if len(answers) < len(prompts) else None
    for start in range(len(answers), len(prompts), part):

        def on_batch(done: int, start: int = start) -> None:
            timer.update(start + done)
            if should_stop is not None and should_stop():
                raise Cancelled(f"{stage} cancelled after {start + done} of {len(prompts)} prompts")

        torch.manual_seed(params.seed * 1_000_003 + start)
        block = greedy_generate(model, tokenizer, prompts[start : start + part], params.max_new_tokens,
                                params.batch_size, params.max_length, STOP_STRINGS, on_batch,
                                add_special_tokens=prompt_format == "alpaca",
                                temperature=params.temperature if params.do_sample else 0.0, top_p=params.top_p)
        with open(parts_path, "a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps({"output": answer}) + "\n" for answer in block))
        answers += block
    return answers


def _finished_parts(parts_path: Path, part: int, total: int) -> list[str]:
    """The answers of the whole parts in `parts_path` (a part cut short by a kill is dropped, and the file cut
    back to the whole parts so that the next part follows them)."""
    if not parts_path.is_file():
        return []
    answers, lines = [], parts_path.read_text(encoding="utf-8").splitlines()
    for line in lines:
        try:
            answers.append(json.loads(line)["output"])
        except (json.JSONDecodeError, KeyError, TypeError):
            break
    kept = answers if len(answers) == total else answers[: len(answers) // part * part]
    if len(kept) < len(lines):  # cut back to whole parts, so that the next part follows them
        write_text_atomically(parts_path, "".join(json.dumps({"output": answer}) + "\n" for answer in kept))
    return kept
