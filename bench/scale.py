"""Materialization at scale: wall time and peak memory against model size, on random-weight checkpoints of real
shapes made here (no download); run by hand, results in docs/BENCHMARKS.md ("Scale").

    .venv/bin/python bench/scale.py [--models smollm2-135m,qwen3-1.7b] [--work /tmp/cbd-scale] [--repeat 3]
                                    [--what prune,merge]

For each model, whole processes as `/usr/bin/time -v` reports them, page cache warm:
1. the I/O floor: read every input file once and write the output's bytes once (a merge reads two models);
2. `cbd materialize --large M --size 0.7x --importance magnitude` (a shape change: pruning, no calibration run);
3. `cbd materialize --small M' --large M --shape <M's> --alpha 0.5` (a merge with a perturbed copy, default alignment).
Each materialization and its floor run in turns, `--repeat` times (the machine is shared: both sides of a ratio see
the same load); the best of each, their ratio, and the median of the turns' own ratios are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from materialize import CBD, interleaved, timed  # noqa: E402 - the sibling benchmark's process timers

from cbd_engine.io.checkpoint import StreamingWriter  # noqa: E402
from cbd_engine.spec.families import ModelSpec  # noqa: E402

# config.json of each shape, as the model's own repository has it (only what the families read)
LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-5,
         "rope_theta": 100000.0, "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
         "bos_token_id": 1, "eos_token_id": 2}
QWEN3 = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "hidden_act": "silu", "rms_norm_eps": 1e-6,
         "rope_theta": 1000000.0, "max_position_embeddings": 40960, "vocab_size": 151936, "hidden_size": 2048,
         "intermediate_size": 6144, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
         "head_dim": 128, "torch_dtype": "bfloat16"}
SHAPES = {
    "smollm2-135m": {**LLAMA, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3},
    "smollm2-360m": {**LLAMA, "hidden_size": 960, "intermediate_size": 2560, "num_hidden_layers": 32,
                     "num_attention_heads": 15, "num_key_value_heads": 5},
    "gpt2-xl": {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 1600, "n_layer": 48,
                "n_head": 25, "n_inner": None, "n_positions": 1024, "vocab_size": 50257, "layer_norm_epsilon": 1e-5,
                "activation_function": "gelu_new", "tie_word_embeddings": True},
    "pythia-1.4b": {"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"], "hidden_size": 2048,
                    "intermediate_size": 8192, "num_hidden_layers": 24, "num_attention_heads": 16,
                    "max_position_embeddings": 2048, "vocab_size": 50304, "layer_norm_eps": 1e-5,
                    "rotary_pct": 0.25, "use_parallel_residual": True, "tie_word_embeddings": False},
    "qwen3-1.7b-tied": {**QWEN3, "tie_word_embeddings": True},
    "qwen3-1.7b-untied": {**QWEN3, "tie_word_embeddings": False},
    "smollm2-1.7b": {**LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                     "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 130000.0},
}
# as the models are published: Qwen3 and SmolLM2-1.7B in bfloat16, Pythia in float16 (bfloat16 here), the rest float32
DTYPES = {"qwen3-1.7b-tied": torch.bfloat16, "qwen3-1.7b-untied": torch.bfloat16, "smollm2-1.7b": torch.bfloat16,
          "pythia-1.4b": torch.bfloat16}
SHARD_BYTES = 1 << 30  # shards and an index, as hub checkpoints of this size come


def make_checkpoint(name: str, out: Path, seed: int = 0, like: Path | None = None) -> Path:
    """A checkpoint of the named shape with random weights (one tensor in memory at a time); `like`: a copy of that
    checkpoint's weights plus 1% noise (a perturbed copy, for merges)."""
    if (out / "config.json").is_file():
        return out
    from cbd_engine.io.checkpoint import SafetensorsReader

    config = SHAPES[name]
    spec = ModelSpec.from_config(config)
    dtype = DTYPES.get(name, torch.float32)
    names = [(n, spec.architecture.tensor_shape(t, spec.shape)) for n, t, _ in spec.architecture.tensor_names(
        spec.shape)]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    writer = StreamingWriter(tmp, names, dtype, SHARD_BYTES)
    generator = torch.Generator().manual_seed(seed)
    reader = SafetensorsReader(like) if like is not None else None
    for tensor_name, shape in names:
        noise = torch.randn(shape, generator=generator) * 0.02
        tensor = reader.read(tensor_name).float() + 0.01 * noise if reader is not None else noise
        writer.write(tensor_name, [tensor.to(dtype)])
    writer.close()
    (tmp / "config.json").write_text(json.dumps({**config, "torch_dtype": str(dtype).removeprefix("torch.")}))
    tmp.rename(out)
    return out


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def io_floor(inputs: list[Path], output_bytes: int, out: Path) -> tuple[float, float]:
    """Read every input file once, write `output_bytes` once: the floor of any materialization."""
    files = " ".join(str(p) for folder in inputs for p in sorted(folder.glob("*.safetensors")))
    return timed(["sh", "-c", f"cat {files} > /dev/null && head -c {output_bytes} /dev/zero > {out}"])


def measure(name: str, work: Path, repeat: int, what: set[str]) -> dict:
    model = make_checkpoint(name, work / name)
    params = ModelSpec.from_config(SHAPES[name]).num_params
    row: dict[str, object] = {"model": name, "params": params, "weights_mib": weight_bytes(model) / 2**20,
                              "load_before": os.getloadavg()[0]}
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)
    if "prune" in what:
        subprocess.run(["sh", "-c", f"cat {model}/*.safetensors > /dev/null"], check=True)

        def prune() -> tuple[float, float]:
            shutil.rmtree(out, ignore_errors=True)
            return timed([*CBD, "materialize", "--large", str(model), "--size", str(int(params * 0.7)),
                          "--importance", "magnitude", "--out", str(out)])

        prune()  # the anchor's hashes are computed once and cached beside it
        pruned = weight_bytes(out)
        result = interleaved(repeat, prune, lambda: io_floor([model], pruned, work / "floor.bin"))
        row.update({f"prune_{key.replace('baseline', 'floor')}": value for key, value in result.items()})
    if "merge" in what:
        copy = make_checkpoint(name, work / f"{name}-perturbed", seed=1, like=model)
        subprocess.run(["sh", "-c", f"cat {model}/*.safetensors {copy}/*.safetensors > /dev/null"], check=True)
        shape = ModelSpec.from_config(SHAPES[name]).shape.to_dict()

        def merge() -> tuple[float, float]:
            shutil.rmtree(out, ignore_errors=True)
            return timed([*CBD, "materialize", "--small", str(copy), "--large", str(model), "--shape",
                          json.dumps(shape), "--alpha", "0.5", "--out", str(out)])

        merge()
        merged = weight_bytes(out)
        row["merge_alignment"] = json.loads((out / "cbd.json").read_text()).get("alignment")
        result = interleaved(repeat, merge, lambda: io_floor([model, copy], merged, work / "floor.bin"))
        row.update({f"merge_{key.replace('baseline', 'floor')}": value for key, value in result.items()})
    shutil.rmtree(out, ignore_errors=True)
    (work / "floor.bin").unlink(missing_ok=True)
    row["load_after"] = os.getloadavg()[0]
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default=",".join(SHAPES))
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cbd-scale"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--what", default="prune,merge", help="prune, merge or both")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        print(json.dumps(measure(name, work, args.repeat, set(args.what.split(",")))), flush=True)


if __name__ == "__main__":
    main()
