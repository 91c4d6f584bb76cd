"""An ONNX export run by ONNX Runtime GenAI itself (the onnxruntime-genai wheel, CPU): greedy tokens, answers
through the folder's own tokenizer and chat template, and the validation loss of the export as the device runs it.

The loss: after a prompt is appended, the generator's `logits` output holds the logits of every prompt position
([1, tokens, vocab]), so the whole forward pass, output head included, is the runtime's; only the cross-entropy
(cbd_engine/export/measure.py, the engine's response-token loss) runs outside it, on the same token ids as the
safetensors model's validation loss.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cbd_engine.export.measure import cross_entropy_sum, mean_loss, scored_positions, validation_examples
from cbd_engine.spec.progress import ProgressCallback, no_progress


class OrtGenAI:
    """onnxruntime-genai serving one exported folder in this process."""

    def __init__(self, path: str | Path):
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(path))
        self.context = context_length(path)

    def _generator(self, ids: list[int], max_length: int, **search: object):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(max_length=max_length, **search)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(ids)
        return generator

    def _run(self, ids: list[int], new_tokens: int, **search: object) -> list[int]:
        """Greedy tokens after `ids` until `new_tokens` or the end-of-sequence token (not returned)."""
        generator = self._generator(ids, len(ids) + new_tokens, do_sample=False, **search)
        while not generator.is_done():
            generator.generate_next_token()
        return [int(t) for t in generator.get_sequence(0)[len(ids):]]

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """The next `new_tokens` greedy tokens after the token ids `ids`; end-of-sequence is held back until then
        (min_length), as transformers' min_new_tokens does."""
        return self._run(ids, new_tokens, min_length=len(ids) + new_tokens)

    def chat(self, message: str, max_tokens: int = 64) -> str:
        """A greedy answer to one user message, through the folder's own chat template and tokenizer."""
        tokenizer = self.og.Tokenizer(self.model)
        prompt = tokenizer.apply_chat_template(json.dumps([{"role": "user", "content": message}]),
                                               add_generation_prompt=True)
        ids = [int(t) for t in tokenizer.encode(prompt)]
        return tokenizer.decode(self._run(ids, max_tokens))

    def logits(self, ids: list[int]) -> np.ndarray:
        """[tokens, vocab] float32: the logits at every position of `ids`."""
        return np.asarray(self._generator(ids, len(ids)).get_output("logits"))[0]


@contextlib.contextmanager
def ort_genai(path: str | Path) -> Iterator[OrtGenAI]:
    runtime = OrtGenAI(path)
    try:
        yield runtime
    finally:
        del runtime.model  # the session's weights are freed here, not at some later collection


def context_length(path: str | Path) -> int:
    """The positions the export was built for (genai_config.json): the generator refuses longer sequences."""
    return int(json.loads((Path(path) / "genai_config.json").read_text())["model"]["context_length"])


def onnx_validation_loss(path: str | Path, tokenizer_folder: str | Path, data_path: str | Path,
                         max_rows: int | None = 200, max_length: int = 512, prompt_format: str = "alpaca",
                         progress: ProgressCallback = no_progress) -> float:
    """The response-token loss of an ONNX export run by onnxruntime-genai, on the validation rows of an instruction
    file tokenized by the model's own tokenizer; rows cut to the export's context where that is shorter."""
    examples = validation_examples(tokenizer_folder, data_path, max_rows, min(max_length, context_length(path)),
                                   prompt_format)

    def example_loss(example) -> tuple[float, int]:
        positions, targets = scored_positions(example)
        return cross_entropy_sum(runtime.logits(example.input_ids)[positions], targets), len(positions)

    with ort_genai(path) as runtime:
        return mean_loss(examples, example_loss, progress)
