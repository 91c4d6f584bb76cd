"""Greedy answers to a few fixed instructions: what a person reads first to judge a model (a loss alone hides a model
that answers "The is a\\nThe is a"). Every model the service makes carries them in its metrics."""

from __future__ import annotations

from pathlib import Path

from cbd_engine.data.rows import InstructionRow
from cbd_engine.spec.options import SAMPLE_PROMPTS, SAMPLE_TOKENS


def sample_answers(model_dir: str | Path, prompts: tuple[str, ...] = SAMPLE_PROMPTS, prompt_format: str = "alpaca",
                   max_new_tokens: int = SAMPLE_TOKENS, model=None) -> list[dict]:
    """[{prompt, answer}]: greedy, in the chain's prompt format (the one its anchors were distilled on)."""
    import torch

    from cbd_engine.data.batches import format_prompt
    from cbd_engine.evaluation import STOP_STRINGS
    from cbd_engine.evaluation.scoring import greedy_generate
    from cbd_engine.nn.loading import load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model = (model if model is not None else load_model(model_dir)).eval()
    texts = [format_prompt(tokenizer, InstructionRow(prompt, "", ""), prompt_format)[0] for prompt in prompts]
    with torch.no_grad():
        answers = greedy_generate(model, tokenizer, texts, max_new_tokens=max_new_tokens, max_length=512,
                                  stop=STOP_STRINGS, add_special_tokens=prompt_format == "alpaca")
    return [{"prompt": prompt, "answer": answer} for prompt, answer in zip(prompts, answers, strict=True)]
