"""A GGUF file run by llama.cpp itself (the `xllamacpp` wheel: llama.cpp's own server, in process): greedy tokens,
and the validation loss of the export as the device will run it.

The loss: llama.cpp's server returns no logits for prompt tokens, but with pooling "none" its `/embedding` route
returns, per token, the final normed hidden state (`t_embd`, the input of the output head; unnormalized for pooling
none). The one step run outside llama.cpp is the output head: those states times the file's own head weights
(dequantized by `gguf.quants`, so quantization of the head counts), then the same response-token cross-entropy as
cbd_engine.nn.validation (cbd_engine/export/measure.py), on the same token ids.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from cbd_engine.data.batches import Example
from cbd_engine.export.measure import cross_entropy_sum, mean_loss, scored_positions, validation_examples
from cbd_engine.spec.progress import ProgressCallback, no_progress

CONTEXT = 1024  # tokens a session holds: the validation rows' 512 and generous room for samples


def quantize(w: np.ndarray, kind: str) -> np.ndarray:
    """The rows of a 2-D float array as GGUF blocks of type `kind` (uint8, one row of blocks per row), by llama.cpp's
    own quantizer, `ggml_quantize_chunk`, which the xllamacpp wheel exports. Why not `gguf.quants`: it cannot write
    the K-quants (NotImplementedError), and for the types it can write (Q8_0, Q5_0, Q4_0) llama.cpp's bytes are the
    same (tests/test_export.py checks it) and are made in C, not numpy. Called through ctypes because the wheel's
    Python API has no quantizer."""
    import gguf

    rows, width = w.shape
    weights_per_block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    if width % weights_per_block:
        raise ValueError(f"rows of {width} are not whole {kind} blocks of {weights_per_block}")
    src = np.ascontiguousarray(w, dtype=np.float32)
    out = np.empty((rows, width // weights_per_block * block_bytes), dtype=np.uint8)
    written = _ggml_quantize_chunk()(int(gguf.GGMLQuantizationType[kind]), src.ctypes.data, out.ctypes.data, 0,
                                     rows, width, None)
    if written != out.nbytes:
        raise RuntimeError(f"llama.cpp wrote {written} bytes of {kind}, expected {out.nbytes}")
    return out


@functools.cache
def _ggml_quantize_chunk() -> ctypes._CFuncPtr:
    """size_t ggml_quantize_chunk(enum ggml_type, const float *src, void *dst, int64_t start, int64_t nrows,
    int64_t n_per_row, const float *imatrix) from the wheel's own library (ggml.h)."""
    import xllamacpp.xllamacpp as native

    function = ctypes.CDLL(native.__file__).ggml_quantize_chunk
    function.restype = ctypes.c_size_t
    function.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_int64, ctypes.c_void_p]
    return function


class LlamaCpp:
    """llama.cpp serving one GGUF file in this process; `embedding=True` serves hidden states (llama.cpp's server
    answers either completions or embeddings)."""

    def __init__(self, path: str | Path, embedding: bool = False, context: int = CONTEXT, threads: int = 2):
        import xllamacpp

        params = xllamacpp.CommonParams()
        params.model.path = str(path)
        params.n_ctx = context
        params.n_parallel = 1
        params.cpuparams.n_threads = threads
        params.cpuparams_batch.n_threads = threads
        params.warmup = False
        params.verbosity = -1
        if embedding:
            params.embedding = True
            params.pooling_type = xllamacpp.llama_pooling_type.LLAMA_POOLING_TYPE_NONE
            params.n_batch = params.n_ubatch = context  # a row's tokens in one micro-batch, as embeddings need
        self.server = xllamacpp.Server(params)

    def greedy(self, ids: list[int], new_tokens: int) -> list[int]:
        """The next `new_tokens` greedy tokens after the token ids `ids` (given as ids: no tokenizer in between).
        Read from the native /completion's `tokens`: the OpenAI form's per-token entries merge a token that ends
        inside a UTF-8 character (SmolLM2's 'Ġí') into the next one, so its id would be missing."""
        import httpx

        response = httpx.post(f"{self.server.listening_address}/completion", timeout=600, json={
            "prompt": ids, "n_predict": new_tokens, "temperature": 0.0, "top_k": 1, "cache_prompt": False,
            "ignore_eos": True, "return_tokens": True})
        if response.status_code != 200:
            raise RuntimeError(f"llama.cpp /completion: {response.status_code} {response.text}")
        return response.json()["tokens"]

    def chat(self, message: str, max_tokens: int = 64) -> str:
        """A greedy answer to one user message, through the file's own chat template and tokenizer."""
        result = self.server.handle_chat_completions({"messages": [{"role": "user", "content": message}],
                                                      "max_tokens": max_tokens, "temperature": 0.0, "top_k": 1})
        if "error" in result:
            raise RuntimeError(f"llama.cpp: {result['error']}")
        return result["choices"][0]["message"]["content"]

    def hidden_states(self, ids: list[int]) -> np.ndarray:
        """[tokens, hidden]: the final normed hidden state at each position (embedding=True)."""
        import httpx

        response = httpx.post(f"{self.server.listening_address}/embedding", json={"content": [ids]}, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"llama.cpp /embedding: {response.status_code} {response.text}")
        return np.asarray(response.json()[0]["embedding"], dtype=np.float32)


@contextlib.contextmanager
def llama_cpp(path: str | Path, embedding: bool = False) -> Iterator[LlamaCpp]:
    runtime = LlamaCpp(path, embedding)
    try:
        yield runtime
    finally:
        del runtime.server  # the server's threads stop and the model is freed here, not at some later collection


def context_length(path: str | Path) -> int:
    """The positions the file's model was made for: llama.cpp caps its context there."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    arch = fields["general.architecture"].contents()
    return int(fields[f"{arch}.context_length"].contents())


def output_head(path: str | Path) -> np.ndarray:
    """[vocab, hidden] float32: the file's output head (the token embedding when the head is tied), dequantized."""
    import gguf

    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    head = tensors.get("output.weight") or tensors["token_embd.weight"]
    return gguf.quants.dequantize(head.data, head.tensor_type).astype(np.float32)


def example_loss(hidden: np.ndarray, head: np.ndarray, example: Example) -> tuple[float, int]:
    """(cross-entropy sum, scored tokens) of one example: the head applied at the scored positions only."""
    positions, targets = scored_positions(example)
    logits = hidden[positions].astype(np.float64) @ head.T.astype(np.float64)
    return cross_entropy_sum(logits, targets), len(positions)


def gguf_validation_loss(path: str | Path, tokenizer_folder: str | Path, data_path: str | Path,
                         max_rows: int | None = 200, max_length: int = 512, prompt_format: str = "alpaca",
                         progress: ProgressCallback = no_progress) -> float:
    """The response-token loss of a GGUF file run by llama.cpp, on the validation rows of an instruction file,
    tokenized by the model's own tokenizer (as the safetensors model's validation loss is); rows are cut to the
    model's context length where that is shorter than `max_length` (llama.cpp refuses longer inputs)."""
    examples = validation_examples(tokenizer_folder, data_path, max_rows, min(max_length, context_length(path)),
                                   prompt_format)
    head = output_head(path)
    with llama_cpp(path, embedding=True) as runtime:
        return mean_loss(examples, lambda e: example_loss(runtime.hidden_states(e.input_ids), head, e), progress)
