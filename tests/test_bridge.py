"""The SeqKD bridge: spec checks, the source's answers and their cache, a chain whose anchor 0 is a bridge of another
family and vocabulary, and SmolLM2-135M-Instruct teaching a GPT-2 bridge with GPT-2's own tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import DOLLY, save_char_tokenizer
from distill_helpers import tiny_with_tokenizer

from cbd_engine.data.rows import read_instruction_rows, split_rows
from cbd_engine.nn.loading import load_tokenizer
from cbd_engine.pipelines.bridge import generate_responses
from cbd_engine.pipelines.chain import build_chain
from cbd_engine.spec.bridge import GenerationParams
from cbd_engine.spec.chain import parse_spec
from cbd_engine.spec.estimate import estimate_chain_seconds
from cbd_engine.spec.progress import Cancelled

BRIDGE_SHAPE = {"family": "gpt2", "num_layers": 2, "hidden_size": 64, "num_heads": 4, "intermediate_size": 128}
SMALL_GPT2 = {"num_layers": 1, "hidden_size": 32, "num_heads": 2, "num_kv_heads": 2, "head_dim": 16,
              "intermediate_size": 64}
FAST = {"steps": 4, "batch_size": 4, "max_length": 64, "learning_rate": 3e-3, "eval_rows": 6, "device": "cpu",
        "checkpoint_every": 2}
FEW_TOKENS = {"max_new_tokens": 12, "batch_size": 8, "max_length": 64}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama with a 512-token BPE vocabulary: the bridge below is a GPT-2 with a character vocabulary."""
    return tiny_with_tokenizer(tmp_path_factory.mktemp("bridge") / "source", seed=3)


@pytest.fixture(scope="module")
def char_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("char-tokenizer")
    save_char_tokenizer(folder, 200)
    return folder


@pytest.fixture(autouse=True)
def _generation_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CBD_GENERATIONS_DIR", str(tmp_path / "generations"))


def _spec(source, bridge, anchors=None, **distillation):
    return {"name": "bridged", "source": str(source), "bridge": bridge, "anchors": anchors or [{"shape": SMALL_GPT2}],
            "dataset": {"path": str(DOLLY), "prompt_format": "alpaca"},
            "distillation": {**FAST, **distillation}, "device": "cpu"}


def _bridge(char_tokenizer, **fields):
    return {"model": BRIDGE_SHAPE, "tokenizer": str(char_tokenizer), "method": "seqkd", "num_samples": 32,
            "epochs": 2, "learning_rate": 3e-3, "generation": FEW_TOKENS, **fields}


def test_bridge_spec_errors_name_the_field(source, char_tokenizer):
    cases = [
        ({"method": "minillm"}, r"bridge\.method"),
        ({"model": None}, r"bridge\.model is required"),
        ({"steps": 3}, "bridge has unknown fields"),
        ({"model": {**BRIDGE_SHAPE, "family": "t5"}}, r"bridge\.model\.family"),
        ({"model": {**BRIDGE_SHAPE, "family": "llama"}, "tokenizer": None}, r"bridge\.tokenizer is required"),
        ({"model": {**BRIDGE_SHAPE, "head_dim": 8}}, r"bridge\.model: gpt2 needs hidden_size == num_heads"),
        ({"model": {**BRIDGE_SHAPE, "max_position_embeddings": 32}}, "must hold the chain's max_length"),
        ({"model": str(source)}, r"bridge\.tokenizer goes with a shape"),
        ({"epochs": 0}, r"bridge\.epochs"),
        ({"num_samples": 0}, r"bridge\.num_samples"),
        ({"generation": {"temperature": 0}}, r"bridge\.generation\.temperature"),
        ({"generation": {"do_sample": False, "responses_per_prompt": 2}}, "responses_per_prompt"),
        ({"generation": {"top_k": 5}}, "bridge.generation has unknown fields"),
        ({"generation": {"max_new_tokens": "many"}}, r"bridge\.generation\.max_new_tokens must be of type int"),
        ({"epochs": "ten"}, r"bridge\.epochs"),
    ]
    for fields, message in cases:
        with pytest.raises(ValueError, match=message):
            parse_spec(_spec(source, _bridge(char_tokenizer, **fields)))
    with pytest.raises(ValueError, match="sft_epochs"):
        parse_spec(_spec(source, _bridge(char_tokenizer), sft_epochs=1))
    # the API's optional fields arrive as null and count as absent
    plan = parse_spec(_spec(source, {"model": {**BRIDGE_SHAPE, "vocab_size": None}, "tokenizer": None,
                                     "method": "seqkd", "num_samples": None, "epochs": 1, "generation": None}))
    assert plan.bridge.generation == GenerationParams() and plan.bridge.num_samples is None


def test_estimate_counts_the_bridge_and_stays_torch_free(source, char_tokenizer):
    plain = estimate_chain_seconds(_spec(source, None))
    bridged = _spec(source, _bridge(char_tokenizer, num_samples=1000, generation={"max_new_tokens": 256}))
    assert estimate_chain_seconds(bridged) > plain
    script = ("import json, sys; from cbd_engine.spec.estimate import estimate_chain_seconds; "
              f"print(estimate_chain_seconds(json.loads({json.dumps(json.dumps(bridged))}))); "
              "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", script], check=True, capture_output=True)


def test_answers_are_cached_by_source_prompts_and_parameters(source, tmp_path, monkeypatch):
    rows = split_rows(read_instruction_rows(DOLLY)).train[:6]
    params = GenerationParams(**FEW_TOKENS)
    first = generate_responses(source, rows, params, tmp_path / "cache", device="cpu")
    assert not first.cached and first.stats["responses"] == 6
    assert [(r.instruction, r.input) for r in first.rows] == [(r.instruction, r.input) for r in rows]
    assert [r.output for r in first.rows] != [r.output for r in rows]  # the source's answers, not the data set's
    assert read_instruction_rows(first.path) == first.rows

    elsewhere = generate_responses(source, rows, params, tmp_path / "elsewhere", device="cpu")
    assert elsewhere.rows == first.rows and elsewhere.key == first.key  # seeded sampling: the same answers again

    def no_model(*args, **kwargs):
        raise AssertionError("a cached generation loaded the source")

    monkeypatch.setattr("cbd_engine.nn.loading.load_model", no_model)
    again = generate_responses(source, rows, params, tmp_path / "cache", device="cpu")
    assert again.cached and again.rows == first.rows and again.stats == first.stats
    monkeypatch.undo()

    other = generate_responses(source, rows, replace(params, seed=1, responses_per_prompt=2), tmp_path / "cache",
                               device="cpu")
    assert not other.cached and other.key != first.key and len(other.rows) == 12
    assert [r.output for r in other.rows[::2]] != [r.output for r in first.rows]
    assert len(list((tmp_path / "cache").glob("*.jsonl"))) == 2


def test_a_cancelled_generation_resumes_after_its_last_finished_part(source, tmp_path):
    """Parts of 8 batches: cancelled in the second part, the generation keeps the first; resumed, it generates only
    the rest and gives the answers of an uninterrupted run (each part seeds its own sampling)."""
    from cbd_engine.pipelines.bridge import BATCHES_PER_PART

    rows = split_rows(read_instruction_rows(DOLLY)).train[:21]
    params = GenerationParams(max_new_tokens=6, batch_size=2, max_length=64)
    part = params.batch_size * BATCHES_PER_PART
    whole = generate_responses(source, rows, params, tmp_path / "whole", device="cpu")
    batches = {"n": 0}

    def stop_in_the_second_part() -> bool:
        batches["n"] += 1
        return batches["n"] > BATCHES_PER_PART + 2

    with pytest.raises(Cancelled):
        generate_responses(source, rows, params, tmp_path / "cache", device="cpu", should_stop=stop_in_the_second_part)
    parts = (tmp_path / "cache" / f"{whole.key}.parts.jsonl").read_text().splitlines()
    assert len(parts) == part and not (tmp_path / "cache" / f"{whole.key}.jsonl").exists()
    with open(tmp_path / "cache" / f"{whole.key}.parts.jsonl", "a") as handle:
        handle.write('{"output": "a part cut short by a kill"}\n{"outp')
    events = []
    resumed = generate_responses(source, rows, params, tmp_path / "cache", device="cpu", progress=events.append)
    assert events[0].step == part and events[-1].step == len(rows)
    assert resumed.rows == whole.rows and not resumed.cached
    assert not (tmp_path / "cache" / f"{whole.key}.parts.jsonl").exists()


def test_a_second_generation_of_the_same_answers_waits_for_the_first(source, tmp_path):
    import fcntl
    import threading
    import time

    rows = split_rows(read_instruction_rows(DOLLY)).train[:4]
    params = GenerationParams(max_new_tokens=6, batch_size=2, max_length=64)
    key = generate_responses(source, rows, params, tmp_path / "elsewhere", device="cpu").key
    (tmp_path / "cache").mkdir()
    results = []
    with open(tmp_path / "cache" / f"{key}.lock", "w") as held:  # another process generating these answers
        fcntl.flock(held, fcntl.LOCK_EX)
        waiting = threading.Thread(target=lambda: results.append(
            generate_responses(source, rows, params, tmp_path / "cache", device="cpu")))
        waiting.start()
        time.sleep(1.0)
        assert waiting.is_alive() and not list((tmp_path / "cache").glob("*.jsonl"))
    waiting.join(timeout=60)
    assert results and results[0].key == key


def test_chain_with_a_bridge_builds_it_as_anchor_zero_and_resumes(source, char_tokenizer, tmp_path):
    out = tmp_path / "chain"
    spec = _spec(source, _bridge(char_tokenizer))
    stages = []

    def stop_in_bridge_training() -> bool:
        return stages.count("anchor 0: bridge") >= 4  # a few steps in, past the step-2 checkpoint

    with pytest.raises(Cancelled):
        build_chain(spec, out, progress=lambda e: stages.append(e.stage), should_stop=stop_in_bridge_training)
    assert "anchor 0: generate (train)" in stages and (out / "anchor-00.work").is_dir()
    stages.clear()
    result = build_chain(spec, out, resume=True, progress=lambda e: stages.append(e.stage))
    assert "anchor 0: generate (train)" not in stages  # the answers came from the cache

    bridge, pruned = result.anchors
    assert result.family == "gpt2" and bridge.shape.num_layers == 2 and pruned.shape.hidden_size == 32
    assert bridge.shape.vocab_size == len(load_tokenizer(char_tokenizer)) == pruned.shape.vocab_size
    assert load_tokenizer(bridge.path).get_vocab() == load_tokenizer(char_tokenizer).get_vocab()
    assert bridge.metrics["validation_loss"] < bridge.metrics["validation_loss_before"] - 0.5
    assert bridge.metrics["steps"] == 16  # 2 epochs of 32 answers in batches of 4
    lineage = json.loads((bridge.path / "cbd.json").read_text())["distillation"]
    assert lineage["role"] == "bridge" and lineage["source"] == str(source)
    assert lineage["generation"]["max_new_tokens"] == 12 and lineage["generations"]["train"]["responses"] == 32
    assert lineage["generations"]["valid"]["responses"] == 6  # the validation rows' prompts, eval_rows of them
    assert json.loads((pruned.path / "cbd.json").read_text())["distillation"]["teacher"] == str(bridge.path)
    assert sorted(p.name for p in out.iterdir()) == ["anchor-00", "anchor-01", "chain.json", "spec.json"]


@pytest.mark.slow
def test_smollm2_teaches_a_gpt2_bridge_across_vocabularies(smollm2, tmp_path):
    """SmolLM2-135M-Instruct (Llama, 49152 tokens) answers; a fresh 4-layer GPT-2 with GPT-2's tokenizer (50257)
    learns the answers: its loss on held-out answers falls clearly."""
    from cbd_engine.io.zoo import gpt2_tokenizer

    bridge = {"model": {"family": "gpt2", "num_layers": 4, "hidden_size": 128, "num_heads": 4,
                        "intermediate_size": 512}, "num_samples": 16, "epochs": 12, "learning_rate": 3e-3,
              "generation": {"max_new_tokens": 32, "max_length": 256}}
    anchors = [{"shape": {**SMALL_GPT2, "num_layers": 2, "hidden_size": 64, "num_heads": 2, "num_kv_heads": 2,
                          "head_dim": 32}}]
    result = build_chain(_spec(smollm2, bridge, anchors, max_length=256, batch_size=8, eval_rows=8), tmp_path / "out")
    anchor = result.anchors[0]
    assert anchor.shape.vocab_size == 50257
    assert load_tokenizer(anchor.path)("Hello world")["input_ids"] == \
        load_tokenizer(gpt2_tokenizer())("Hello world")["input_ids"] == [15496, 995]
    before, after = anchor.metrics["validation_loss_before"], anchor.metrics["validation_loss"]
    assert after < before - 1.5, (before, after)  # 10.85 (uniform over 50257) -> 8.89 when written
