"""Benchmark the materializer on SmolLM2-135M-Instruct (float32, 538 MB); run by hand, results in docs/BENCHMARKS.md.

    .venv/bin/python bench/materialize.py [--mergekit PATH_TO_mergekit-yaml] [--repeat 3]

1. equal-shape alpha-merge of the model with a perturbed copy (`cbd materialize --alpha 0.5`), whole process:
   wall time and peak RSS from /usr/bin/time; against `mergekit-yaml` linear merge of the same two models when
   mergekit is given, and against `cat` of both inputs (the floor of any merge);
2. in-process materialization time against reading both inputs and writing the output once;
3. a shape-changing materialization: anchors of ~135M and ~60M (derived by pruning), target 100M, with the default
   alpha "auto" and with a given alpha, whole processes in turns (`--repeat` each); the anchors' importance and dev
   losses are cached by a first run, whose cost (on an empty cache) is reported apart.

    .venv/bin/python bench/materialize.py --only auto-alpha [--repeat 3]      # step 3 alone
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CBD = [sys.executable, "-m", "cbd_cli"]
DOLLY = ROOT.parent / "shared/data/instruction/minillm_dolly_dev.jsonl"


def timed(command: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of a whole process, as /usr/bin/time -v reports them."""
    result = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True, text=True, cwd=cwd,
                            env={**os.environ, **env} if env else None)
    if result.returncode:
        raise RuntimeError(f"{command} failed:\n{result.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", result.stderr)
    hours, minutes, seconds = (float(g) if g else 0.0 for g in wall.groups())
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    return hours * 3600 + minutes * 60 + seconds, rss / 1024


def perturbed_copy(source: Path, out: Path, permute_ffn: bool = False) -> Path:
    """The model plus 1% noise; with `permute_ffn`, each layer's FFN neurons also in a random order (the same
    function: an alignment has to find the order again)."""
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    tensors = {k: v + 0.01 * torch.randn(v.shape, generator=generator) for k, v in
               load_file(source / "model.safetensors").items()}
    layers = sorted({int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.")})
    for layer in layers if permute_ffn else []:
        prefix = f"model.layers.{layer}.mlp."
        order = torch.randperm(tensors[prefix + "up_proj.weight"].shape[0], generator=generator)
        for name in ("gate_proj.weight", "up_proj.weight"):
            tensors[prefix + name] = tensors[prefix + name][order]
        tensors[prefix + "down_proj.weight"] = tensors[prefix + "down_proj.weight"][:, order]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for path in source.iterdir():
        if path.suffix != ".safetensors" and path.is_file() and not path.name.startswith("."):
            shutil.copyfile(path, out / path.name)
    return out


def best_of(repeat: int, run) -> tuple[float, float]:
    results = [run() for _ in range(repeat)]
    return min(r[0] for r in results), max(r[1] for r in results)


def interleaved(repeat: int, run, baseline) -> dict[str, float]:
    """`run` and `baseline` (each: (wall s, peak RSS MiB)) in turns, so both sides of the ratio see the same load on a
    shared machine: the best wall of each, their ratio, the median of the turns' own ratios, `run`'s largest RSS."""
    runs, baselines = [], []
    for _ in range(repeat):
        runs.append(run())
        baselines.append(baseline())
    ratios = sorted(r[0] / b[0] for r, b in zip(runs, baselines, strict=True))
    best, best_baseline = min(r[0] for r in runs), min(b[0] for b in baselines)
    return {"wall_s": best, "baseline_s": best_baseline, "ratio": best / best_baseline,
            "median_turn_ratio": ratios[len(ratios) // 2], "rss_mib": max(r[1] for r in runs)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mergekit", help="path to mergekit-yaml, to time it on the same merge")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "cbd-bench"))
    parser.add_argument("--only", choices=["auto-alpha"], help="run step 3 alone")
    args = parser.parse_args()

    from cbd_engine.io.zoo import smollm2_135m_instruct

    work = Path(args.work)
    source = smollm2_135m_instruct()
    if args.only:
        print(json.dumps(shape_changing(source, work, args.repeat), indent=2))
        return
    other = perturbed_copy(source, work / "smollm2-perturbed")
    shape = json.loads(subprocess.run([*CBD, "inspect", str(source), "--json"], capture_output=True, text=True,
                                      check=True).stdout)["shape"]
    out = work / "merged"
    report: dict[str, object] = {"cpu_count": os.cpu_count()}

    permuted = perturbed_copy(source, work / "smollm2-permuted", permute_ffn=True)

    def cbd_merge(align: str = "none", small: Path = other) -> tuple[float, float]:
        """`--align none`: units by position, the same work as mergekit's linear merge; `auto` (the default) adds
        the alignment that two checkpoints without recorded lineage get: units already in correspondence are
        paired without a solve, permuted ones (`small=permuted`) are matched by the assignment solver."""
        shutil.rmtree(out, ignore_errors=True)
        return timed([*CBD, "materialize", "--small", str(small), "--large", str(source), "--shape",
                      json.dumps(shape), "--alpha", "0.5", "--dtype", "float32", "--align", align, "--out", str(out)])

    subprocess.run(["cat", str(source / "model.safetensors"), str(other / "model.safetensors")],
                   stdout=subprocess.DEVNULL, check=True)  # warm the page cache for everyone alike
    cbd_merge()  # first run also hashes the anchors once (cached beside them)
    report["cbd_merge_wall_s"], report["cbd_merge_peak_rss_mib"] = best_of(args.repeat, cbd_merge)
    report["cbd_merge_hungarian_wall_s"], report["cbd_merge_hungarian_peak_rss_mib"] = best_of(
        args.repeat, lambda: cbd_merge("auto"))
    report["cbd_merge_default_alignment"] = json.loads((out / "cbd.json").read_text())["alignment"]
    report["cbd_merge_permuted_wall_s"], report["cbd_merge_permuted_peak_rss_mib"] = best_of(
        args.repeat, lambda: cbd_merge("auto", permuted))
    report["cbd_merge_permuted_alignment"] = json.loads((out / "cbd.json").read_text())["alignment"]
    report["cat_inputs_wall_s"], _ = best_of(args.repeat, lambda: timed(
        ["sh", "-c", f"cat {source}/model.safetensors {other}/model.safetensors > /dev/null"]))

    if args.mergekit:
        mk_out = work / "mergekit-out"

        def mergekit(second: Path = other) -> tuple[float, float]:
            config = work / "mergekit.yml"
            config.write_text(f"merge_method: linear\ndtype: float32\nmodels:\n  - model: {source}\n    parameters:"
                              f"\n      weight: 0.5\n  - model: {second}\n    parameters:\n      weight: 0.5\n")
            shutil.rmtree(mk_out, ignore_errors=True)
            return timed([args.mergekit, str(config), str(mk_out)])

        report["mergekit_wall_s"], report["mergekit_peak_rss_mib"] = best_of(args.repeat, mergekit)
        report["mergekit_permuted_wall_s"], _ = best_of(args.repeat, lambda: mergekit(permuted))

    report.update(in_process(source, other, shape, work, args.repeat))
    report.update(shape_changing(source, work, args.repeat))
    print(json.dumps(report, indent=2))


def in_process(source: Path, other: Path, shape: dict, work: Path, repeat: int) -> dict:
    """Materialization time inside one process against the I/O floor: read both inputs, write the output once."""
    from cbd_engine.materialization.recipe import materialize

    out = work / "merged-inproc"
    times = []
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        materialize(out, small=other, large=source, shape=shape, alpha=0.5, dtype="float32", align="none")
        times.append(time.perf_counter() - start)
    floor = []
    for _ in range(repeat):
        start = time.perf_counter()
        data = [(p / "model.safetensors").read_bytes() for p in (source, other)]
        (work / "floor.bin").write_bytes(data[0])
        os.sync()
        floor.append(time.perf_counter() - start)
        del data
    (work / "floor.bin").unlink()
    return {"inproc_materialize_s": min(times), "inproc_read_both_write_once_s": min(floor)}


def shape_changing(source: Path, work: Path, repeat: int) -> dict:
    """Anchors ~135M (the source) and ~60M (derived by activation pruning), target 100M: alpha "auto" (the default)
    against a given alpha, in turns. A first auto run on an empty cache pays for the larger anchor's activation
    importance and both anchors' dev losses, cached by the weights' sha256 (a chain's materializations share them)."""
    from cbd_engine.materialization.recipe import materialize

    small = work / "anchor-60M"
    if not small.is_dir():
        materialize(small, large=source, size="60M", calibration=DOLLY, dtype="float32")
    out = work / "slm-100M"

    def run(alpha: str | None = None, cache: Path | None = None) -> tuple[float, float]:
        shutil.rmtree(out, ignore_errors=True)
        given = ["--alpha", alpha] if alpha is not None else []
        return timed([*CBD, "materialize", "--small", str(small), "--large", str(source), "--size", "100M",
                      "--dtype", "float32", *given, "--out", str(out)], env={"CBD_CACHE_DIR": str(cache)} if cache
                     else None)

    with tempfile.TemporaryDirectory() as empty:
        first_wall, _ = run(cache=Path(empty))
    run()  # the real cache, as a chain's later materializations find it
    cbd_json = json.loads((out / "cbd.json").read_text())
    auto = interleaved(repeat, run, lambda: run("0.5"))
    return {"shape_change_100M_auto_against_alpha_0.5": auto, "shape_change_100M_first_auto_empty_cache_s": first_wall,
            "shape_change_100M_params": cbd_json["params"], "shape_change_alignment": cbd_json["alignment"]["method"],
            "shape_change_alpha_search": cbd_json["alpha_search"]}


if __name__ == "__main__":
    main()
