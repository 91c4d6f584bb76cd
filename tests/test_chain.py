"""Chain recipe on tiny models: spec checks, prune-then-distill anchors, registered checkpoints, resume, CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import DOLLY
from distill_helpers import tiny_with_tokenizer

from cbd_engine.pipelines.chain import build_chain, read_chain
from cbd_engine.spec.chain import parse_spec
from cbd_engine.spec.estimate import estimate_chain_seconds
from cbd_engine.spec.progress import Cancelled

SMALL_SHAPE = {"num_layers": 2, "hidden_size": 48, "num_heads": 2, "num_kv_heads": 1, "head_dim": 16,
               "intermediate_size": 64}
FAST = {"steps": 4, "batch_size": 4, "max_length": 64, "learning_rate": 3e-3, "eval_rows": 6, "device": "cpu",
        "checkpoint_every": 2}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return tiny_with_tokenizer(tmp_path_factory.mktemp("chain") / "source", seed=3, num_hidden_layers=3,
                               hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


def _spec(source, anchors, **distillation):
    return {"name": "tiny", "source": str(source), "bridge": None, "anchors": anchors,
            "dataset": {"path": str(DOLLY), "prompt_format": "alpaca"},
            "distillation": {**FAST, **distillation}, "device": "cpu"}


def test_spec_errors_name_the_field(source):
    with pytest.raises(ValueError, match=r"bridge\.method"):
        parse_spec({**_spec(source, [{"size": "1M"}]), "bridge": {"model": "x", "method": "distill"}})
    assert parse_spec(_spec(source, [{"size": "1M"}], mode="minillm", ppo_epochs=2)).distillation["mode"] == "minillm"
    with pytest.raises(ValueError, match="multiple of ppo_epochs"):  # FAST checkpoints every 2 steps
        parse_spec(_spec(source, [{"size": "1M"}], mode="minillm", ppo_epochs=4))
    with pytest.raises(ValueError, match=r"anchors\[0\]"):
        parse_spec(_spec(source, [{"size": "1M", "checkpoint": "/x"}]))
    with pytest.raises(ValueError, match="distill=false"):
        parse_spec(_spec(source, [{"size": "1M", "distill": False}]))
    with pytest.raises(ValueError, match="unknown distillation"):
        parse_spec(_spec(source, [{"size": "1M"}], lr=1))


def test_estimate_grows_with_steps_and_is_torch_free(source):
    short = estimate_chain_seconds(_spec(source, [{"shape": SMALL_SHAPE}], steps=100))
    long = estimate_chain_seconds(_spec(source, [{"shape": SMALL_SHAPE}], steps=1000))
    assert 0 < short < long
    script = ("import json, sys; from cbd_engine.spec.estimate import estimate_chain_seconds; "
              f"print(estimate_chain_seconds(json.loads({json.dumps(json.dumps(_spec(source, [{'size': '1M'}])))}))); "
              "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def test_estimate_counts_the_evaluation_passes_on_the_data_sets_own_rows(source, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(line for line in DOLLY.read_text().splitlines(keepends=True)[:50]))
    spec = {**_spec(source, [{"shape": SMALL_SHAPE}], eval_every=1), "dataset": {"path": str(small)}}
    few, many = (estimate_chain_seconds({**spec, "distillation": {**spec["distillation"], "eval_rows": rows}})
                 for rows in (5, 500))
    assert few == many  # a tenth of 50 rows is 5: asking for 500 evaluates no more
    bigger = estimate_chain_seconds({**spec, "dataset": {"path": str(DOLLY)},
                                     "distillation": {**spec["distillation"], "eval_rows": 500}})
    assert bigger > many


def test_chain_prunes_then_distills_each_anchor_and_resumes(source, tmp_path):
    out = tmp_path / "chain"
    anchors = [{"shape": SMALL_SHAPE}, {"shape": {**SMALL_SHAPE, "num_layers": 1, "intermediate_size": 32}}]
    spec = _spec(source, anchors)
    stages = []
    calls = {"n": 0}

    def stop_in_second_anchor() -> bool:
        calls["n"] += 1
        return stages.count("anchor 2/2: distill") >= 2  # after a step or two of the second distillation

    with pytest.raises(Cancelled):
        build_chain(spec, out, progress=lambda e: stages.append(e.stage), should_stop=stop_in_second_anchor)
    assert (out / "anchor-01" / "metrics.json").is_file() and not (out / "anchor-02").exists()
    assert {"anchor 1/2: prune (importance)", "anchor 1/2: prune (materialize)"} <= set(stages)
    result = build_chain(spec, out, resume=True)
    assert [a.index for a in result.anchors] == [0, 1, 2]
    assert [a.shape.num_layers for a in result.anchors] == [3, 2, 1]
    assert result.anchors[0].params > result.anchors[1].params > result.anchors[2].params
    for anchor in result.anchors[1:]:
        lineage = json.loads((anchor.path / "cbd.json").read_text())
        assert lineage["distillation"]["teacher"] == str(result.anchors[anchor.index - 1].path)
        assert "terms" in lineage  # the materializer's index maps of the pruning
        # kept by the dev rows (step 0 is a candidate), reported on the validation rows
        assert anchor.metrics["dev_loss"] <= anchor.metrics["dev_loss_before"]
        assert anchor.metrics["validation_loss"] > 0 and anchor.metrics["rows"]["dev"] > 0
        assert (anchor.path / "loss_curve.png").is_file()
    for anchor in result.anchors:  # each records the chain's calibration rows: the materializer reads them
        calibration = json.loads((anchor.path / "calibration.json").read_text())
        assert calibration["source"] == spec["dataset"]["path"] and len(calibration["dev_rows"]) > 0
    assert read_chain(out).anchors[2].metrics == result.anchors[2].metrics
    assert sorted(p.name for p in out.iterdir()) == ["anchor-00", "anchor-01", "anchor-02", "chain.json", "spec.json"]


def test_cli_registers_a_checkpoint_as_it_is(source, tmp_path):
    from cbd_cli import main

    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(_spec(source, [{"checkpoint": str(source), "distill": False}])))
    assert main(["chain", "build", str(spec_path), "--out", str(tmp_path / "out")]) == 0
    chain = read_chain(tmp_path / "out")
    assert chain.family == "llama" and len(chain.anchors) == 2
    assert chain.anchors[1].metrics["validation_loss"] == pytest.approx(chain.anchors[0].metrics["validation_loss"])
    assert main(["chain", "build", str(spec_path), "--out", str(tmp_path / "out")]) == 2  # not empty, no --resume


def test_dev_and_validation_rows_never_reach_training_or_calibration(source):
    from cbd_engine.nn.loading import load_tokenizer
    from cbd_engine.pipelines.chain import ChainData
    from cbd_engine.spec.distill_config import DistillConfig

    data = ChainData.load({"path": str(DOLLY)}, source, DistillConfig(max_length=64))
    tokenizer = load_tokenizer(source)
    prompts = {name: {tokenizer.decode(e.input_ids[: e.prompt_length]) for e in getattr(data.examples, name)}
               for name in ("train", "dev", "validation")}
    assert all(prompts.values())
    assert not prompts["train"] & prompts["validation"] and not prompts["train"] & prompts["dev"]
    assert not prompts["dev"] & prompts["validation"]
    assert 80 <= len(data.examples.validation) <= 120 and 80 <= len(data.examples.dev) <= 120  # ~1 in 10 each
    importance = set(data.calibration.importance)  # calibration reads training rows only; dev rows score alphas
    assert len(importance) == 256 and not importance & {row.alpaca_prompt() + row.output for row in
                                                         data.calibration.dev_rows}
    assert all(row.split == "dev" for row in data.calibration.dev_rows)


def test_chain_data_from_a_hugging_face_folder_matches_the_jsonl_file(tmp_path):
    """dataset.hf (here a local folder of the same rows in Dolly's own column names) encodes the same training and
    validation examples as dataset.path, and calibrates on the same training texts."""
    from distill_helpers import small_tokenizer

    from cbd_engine.pipelines.chain import ChainData
    from cbd_engine.spec.distill_config import DistillConfig

    lines = DOLLY.read_text().splitlines()[:200]
    (tmp_path / "rows.jsonl").write_text("\n".join(lines) + "\n")
    folder = tmp_path / "hf"
    folder.mkdir()
    records = [json.loads(line) for line in lines]
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"instruction": r["instruction"], "context": r["input"], "response": r["output"]}) + "\n"
        for r in records))
    config = DistillConfig(max_length=64)
    from_file = ChainData.load({"path": str(tmp_path / "rows.jsonl")}, small_tokenizer(), config)
    from_hf = ChainData.load({"hf": str(folder), "split": "train"}, small_tokenizer(), config)
    assert from_hf.examples == from_file.examples and from_hf.examples.validation
    assert from_hf.calibration.importance == from_file.calibration.importance


def test_teacher_samples_join_the_training_rows_and_are_cached(source, tmp_path, monkeypatch):
    from cbd_engine.pipelines.chain import ChainData
    from cbd_engine.spec.distill_config import DistillConfig

    monkeypatch.setenv("CBD_GENERATIONS_DIR", str(tmp_path / "generations"))
    rows = DOLLY.read_text().splitlines()[:60]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    dataset = {"path": str(tmp_path / "rows.jsonl"), "teacher_samples": 2}
    config = DistillConfig(max_length=32, device="cpu")
    plain = ChainData.load(dataset, source, config)
    sampled = plain.with_teacher_samples(dataset, source, config, lambda event: None, None)
    assert len(sampled.examples.train) == 3 * len(plain.examples.train)  # the data set's answer and two sampled
    assert sampled.examples.dev == plain.examples.dev and sampled.examples.validation == plain.examples.validation
    again = plain.with_teacher_samples(dataset, source, config, lambda event: None, None)
    assert again.examples.train == sampled.examples.train  # read back from the cache, the same answers
    assert len(list((tmp_path / "generations").glob("*.jsonl"))) == 1
    with pytest.raises(ValueError, match="teacher_samples"):
        parse_spec({**_spec(source, [{"size": "1M"}]), "dataset": {**dataset, "teacher_samples": -1}})
