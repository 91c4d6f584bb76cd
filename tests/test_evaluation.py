"""Evaluation: scorers against hand-computed values, task readers on the shared files, `cbd eval` end to end, and
the real SmolLM2-135M-Instruct against the baselines that matter (chance for ARC, the majority class for BoolQ)."""

from __future__ import annotations

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from conftest import DOLLY, SHARED_DATA, save_char_tokenizer

from cbd_engine.evaluation import Settings, TaskSpec, evaluate, parse_tasks, run_multiple_choice, run_perplexity
from cbd_engine.evaluation.scoring import encode_pair, greedy_generate, loglikelihoods, rouge_l
from cbd_engine.evaluation.stats import mean_ci, ratio_ci, wilson_ci
from cbd_engine.evaluation.tasks import (
    ChoiceRow,
    choice_requests,
    fewshot_context,
    read_choice_rows,
    read_summarization_rows,
)

MC = SHARED_DATA / "multiple_choice"


class BigramLM(torch.nn.Module):
    """The logits at position t are log P(. | token t) from a fixed table, so log-likelihoods are known by hand."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embed = torch.nn.Embedding.from_pretrained(torch.eye(len(table)))
        self.head = torch.nn.Linear(len(table), len(table), bias=False)
        self.head.weight.data = table.log().T.contiguous()  # one-hot(token) @ W.T = log table[token]

    @property
    def base_model(self) -> torch.nn.Module:
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.head


@pytest.fixture
def char_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    save_char_tokenizer(tmp_path / "tok", 97)
    return AutoTokenizer.from_pretrained(tmp_path / "tok")


UNIFORM = BigramLM(torch.full((97, 97), 1 / 97))


def test_loglikelihoods_are_the_hand_computed_sums_whatever_the_batching():
    table = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.25, 0.125, 0.125], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]])
    model = BigramLM(table)
    requests = [([0, 1], [2, 3]), ([3], [0]), ([0, 1, 2, 3], [1]), ([2], [2, 2, 2])]
    expected = [(math.log(0.125) + math.log(0.25), 2), (math.log(0.7), 1), (math.log(0.1), 1),
                (3 * math.log(0.25), 3)]
    for batch_size in (1, 3, 8):
        scores = loglikelihoods(model, requests, batch_size=batch_size)
        assert [count for _, count in scores] == [count for _, count in expected]
        assert [total for total, _ in scores] == pytest.approx([total for total, _ in expected], abs=1e-6)
    # a long context loses its start: only P(1 | 3) conditions the last request's token
    assert loglikelihoods(model, [([0, 1, 2, 3], [1])], max_length=2)[0] == pytest.approx((math.log(0.1), 1))


def test_encode_pair_splits_like_the_harness(char_tokenizer):
    context, continuation = encode_pair(char_tokenizer, "Answer: ", "yes")
    ids = char_tokenizer("Answer: yes", add_special_tokens=False)["input_ids"]
    assert context == ids[:7] and continuation == ids[7:]  # the space belongs to the answer
    empty_context, whole = encode_pair(char_tokenizer, "", "abc")
    assert empty_context == [char_tokenizer.eos_token_id] and len(whole) == 3


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_uniform_model_picks_the_shortest_choice_for_acc_and_the_longest_for_acc_norm(tmp_path, char_tokenizer):
    # every token costs log 97: acc sums over 1 + len(choice) tokens (the space, then one per character), so the
    # shortest choice wins; acc_norm divides by len(choice) characters, so (1 + n) / n favours the longest
    rows = [{"question": "Pick?", "choices": ["aaaa", "b"], "label": 1, "source": "t"},
            {"context": "Some text", "question": "is it", "choices": ["no", "maybe"], "label": 1, "source": "t"},
            {"question": "", "choices": ["x y", "x z"], "continuation": "end.", "label": 0, "source": "t"}]
    spec = TaskSpec("multiple_choice", _write_jsonl(tmp_path / "mc.jsonl", rows))
    result = run_multiple_choice(UNIFORM, char_tokenizer, spec, Settings(), lambda event: None)
    # row 1: acc -> "b" (right), acc_norm -> "aaaa" (wrong); row 2: acc -> "no" (wrong), acc_norm -> "maybe" (right);
    # row 3 (partial scoring): both choices score the same continuation, a tie that goes to the first choice (right)
    assert result["rows"] == 3
    assert result["metrics"]["acc"]["value"] == pytest.approx(2 / 3)
    assert result["metrics"]["acc_norm"]["value"] == pytest.approx(2 / 3)
    assert result["metrics"]["acc"]["ci95"] == pytest.approx(list(wilson_ci(2, 3)))
    assert result["baselines"] == {"chance": pytest.approx(0.5), "majority_label": pytest.approx(2 / 3)}


def test_uniform_model_has_perplexity_equal_to_its_vocabulary(tmp_path, char_tokenizer):
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question. " * 20)
    result = run_perplexity(UNIFORM, char_tokenizer, TaskSpec("perplexity", text), Settings(max_length=64),
                            lambda event: None)
    assert result["tokens"] == len(text.read_text()) - 1  # every character but the first, exactly once
    assert result["rows"] == math.ceil(result["tokens"] / 63)
    assert result["metrics"]["perplexity"]["value"] == pytest.approx(97, rel=1e-5)
    low, high = result["metrics"]["nll"]["ci95"]
    assert low == pytest.approx(math.log(97), rel=1e-5) and high == pytest.approx(math.log(97), rel=1e-5)


def test_rouge_l_on_known_strings():
    scores = rouge_l(["the cat on the mat", "completely different", "The cats sat."],
                     ["the cat sat on the mat", "the cat sat on the mat", "the cat sits"])
    # LCS 5 of 5 predicted and 6 reference words: F = 2 * 1 * 5/6 / (1 + 5/6) = 10/11; stemming: cats -> cat, sat/sits
    # do not share a stem, so 2 of 3 and 2 of 3 words match
    assert scores == pytest.approx([10 / 11, 0.0, 2 / 3])


def test_confidence_intervals():
    low, high = wilson_ci(8, 10)
    assert (low, high) == pytest.approx((0.4902, 0.9433), abs=1e-4)
    z2 = 1.959964**2
    assert wilson_ci(0, 50) == pytest.approx((0.0, z2 / (50 + z2)), abs=1e-6)  # not the normal interval's (0, 0)
    assert wilson_ci(50, 50) == pytest.approx((50 / (50 + z2), 1.0), abs=1e-6)
    mean, (low, high) = mean_ci([0.0, 1.0, 2.0, 3.0])
    assert mean == 1.5 and high - mean == pytest.approx(1.959964 * math.sqrt(5 / 3 / 4))
    ratio, (low, high) = ratio_ci([2.0, 4.0, 6.0], [1, 2, 3])  # every row has the same per-token value
    assert ratio == 2.0 and low == pytest.approx(2.0) and high == pytest.approx(2.0)
    assert mean_ci([1.0])[1] is None


@pytest.mark.parametrize("name,count,choices", [("arc_easy_test", 2376, 4), ("boolq_dev", 3270, 2),
                                                ("hellaswag_val_first2000", 2000, 4), ("mmlu_dev", 285, 4),
                                                ("winogrande_dev", 1267, 2)])
def test_choice_readers_on_the_shared_files(name, count, choices):
    rows = read_choice_rows(MC / f"{name}.jsonl")
    assert len(rows) == count and all(len(row.choices) == choices for row in rows)
    assert read_choice_rows(MC / f"{name}.jsonl", limit=7) == rows[:7]
    context, continuation = rows[0].requests()[rows[0].label]
    assert continuation.startswith(" ") and not context.endswith(" ")


def test_prompts_follow_the_harness_conventions():
    boolq, arc, hellaswag = (read_choice_rows(MC / f"{name}.jsonl", 1)[0]
                             for name in ("boolq_dev", "arc_easy_test", "hellaswag_val_first2000"))
    assert boolq.question.endswith("?")  # the shared file's questions carry the "?" the harness appends
    assert boolq.requests()[1] == (boolq.context + "\nQuestion: " + boolq.question + "\nAnswer:", " yes")
    assert ChoiceRow(("no", "yes"), 0, "is it", "Text").query() == "Text\nQuestion: is it?\nAnswer:"
    assert arc.requests()[0] == (f"Question: {arc.question}\nAnswer:", " " + arc.choices[0])
    assert hellaswag.requests()[3] == (hellaswag.context, " " + hellaswag.choices[3])
    winogrande = read_choice_rows(MC / "winogrande_dev.jsonl", 1)[0]
    assert [c for c, _ in winogrande.requests()] == list(winogrande.choices)
    assert {t for _, t in winogrande.requests()} == {" " + winogrande.continuation}


def test_mmlu_shots_come_from_the_same_subject_and_never_the_scored_row():
    pool = read_choice_rows(MC / "mmlu_dev.jsonl")
    row = pool[2]
    prefix = fewshot_context(row, pool, shots=4)
    same_subject = [other for other in pool if other.subject == row.subject]
    assert len(same_subject) == 5
    assert prefix.startswith(f"The following are questions (with answers) about {row.subject.replace('_', ' ')}.")
    assert row.question not in prefix
    assert all(other.answered() in prefix for other in same_subject if other != row)
    requests = choice_requests([row], pool, shots=4)
    assert len(requests) == 4 and all(context.startswith(prefix) for context, _ in requests)
    assert fewshot_context(ChoiceRow(("a", "b"), 0, question="q?"), pool, shots=0) == ""


def test_summarization_reader_uses_the_papers_template():
    rows = read_summarization_rows(SHARED_DATA / "summarization" / "xsum_test_first200.jsonl")
    assert len(rows) == 200
    prompt = rows[0].alpaca_prompt()
    assert "paired with an input" in prompt and "please summarize the article." in prompt
    assert prompt.endswith("### Response:\n") and rows[0].input in prompt


def test_task_specs_are_checked(tmp_path):
    assert parse_tasks([f"rougeL={DOLLY}"])[0].key == "rougeL:minillm_dolly_dev"
    with pytest.raises(ValueError, match="TYPE=PATH"):
        parse_tasks([f"accuracy={DOLLY}"])
    with pytest.raises(FileNotFoundError):
        parse_tasks([f"rougeL={tmp_path / 'missing.jsonl'}"])
    with pytest.raises(ValueError, match="distinct"):
        parse_tasks([f"rougeL={DOLLY}", f"rougeL={DOLLY}"])


def test_generation_needs_room_for_the_prompt(char_tokenizer):
    with pytest.raises(ValueError, match="no room"):
        greedy_generate(UNIFORM, char_tokenizer, ["prompt"], max_new_tokens=64, max_length=64)


def test_response_loss_task_matches_the_engines_response_loss(tiny_model):
    from cbd_engine.data.rows import read_instruction_rows
    from cbd_engine.nn.loading import load_model, load_tokenizer
    from cbd_engine.nn.validation import response_loss

    folder = tiny_model("llama")
    results = evaluate(folder, [f"response_loss={DOLLY}"], limit=6, batch_size=4, device="cpu")
    task = results["tasks"]["response_loss:minillm_dolly_dev"]
    expected = response_loss(load_model(folder), load_tokenizer(folder), read_instruction_rows(DOLLY)[:6],
                             max_length=64)
    assert task["rows"] == 6 and task["metrics"]["loss"]["value"] == pytest.approx(expected, rel=1e-5)
    low, high = task["metrics"]["loss"]["ci95"]
    assert low < expected < high


def test_cbd_eval_writes_every_task_with_metrics_rows_and_intervals(tiny_model, tmp_path):
    from cbd_cli import main

    out = tmp_path / "results.json"
    events = []
    tasks = [f"perplexity={SHARED_DATA / 'text' / 'tinyshakespeare.txt'}", f"response_loss={DOLLY}",
             f"rougeL={DOLLY}", f"summarization={SHARED_DATA / 'summarization' / 'xsum_test_first200.jsonl'}",
             f"multiple_choice={MC / 'mmlu_dev.jsonl'}"]
    argv = ["eval", str(tiny_model("qwen2")), "--limit", "3", "--shots", "1", "--max-new-tokens", "4",
            "--batch-size", "2", "--device", "cpu", "--out", str(out)]
    assert main(argv + [arg for task in tasks for arg in ("--task", task)]) == 0
    results = json.loads(out.read_text())
    assert set(results["tasks"]) == {"perplexity:tinyshakespeare", "response_loss:minillm_dolly_dev",
                                     "rougeL:minillm_dolly_dev", "summarization:xsum_test_first200",
                                     "multiple_choice:mmlu_dev"}
    for task in results["tasks"].values():
        assert task["rows"] == 3
        for value in task["metrics"].values():
            low, high = value["ci95"]
            assert low <= value["value"] <= high
    assert results["settings"]["max_length"] == 64  # capped by the tiny model's positions
    direct = evaluate(tiny_model("qwen2"), tasks[-1:], limit=3, shots=1, device="cpu", progress=events.append)
    assert direct["tasks"]["multiple_choice:mmlu_dev"] == results["tasks"]["multiple_choice:mmlu_dev"]
    assert events[-1].step == events[-1].total == 12 and events[-1].stage == "eval multiple_choice:mmlu_dev"


@pytest.mark.slow
def test_batched_greedy_generation_matches_one_prompt_at_a_time(smollm2):
    from cbd_engine.data.rows import read_instruction_rows
    from cbd_engine.nn.loading import load_model, load_tokenizer

    model, tokenizer = load_model(smollm2).eval(), load_tokenizer(smollm2)
    rows = [row for row in read_instruction_rows(DOLLY) if not row.input][:3]  # short prompts, different lengths
    prompts = [row.alpaca_prompt() for row in rows]
    assert len({len(prompt) for prompt in prompts}) == 3
    batched = greedy_generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=3)
    assert batched == [greedy_generate(model, tokenizer, [p], max_new_tokens=8)[0] for p in prompts]
    assert all(batched)


@pytest.mark.slow
def test_smollm2_arc_easy_is_well_above_chance(smollm2):
    results = evaluate(smollm2, [f"multiple_choice={MC / 'arc_easy_test.jsonl'}"], limit=80, device="cpu")
    task = results["tasks"]["multiple_choice:arc_easy_test"]
    assert task["rows"] == 80 and task["baselines"]["chance"] == 0.25
    acc = task["metrics"]["acc"]
    assert acc["value"] > 0.25 + 0.15 and acc["ci95"][0] > 0.25  # the whole interval, not just the point, clears it


@pytest.mark.slow
def test_smollm2_boolq_is_judged_against_the_majority_class(smollm2):
    limit = 40
    results = evaluate(smollm2, [f"multiple_choice={MC / 'boolq_dev.jsonl'}"], limit=limit, device="cpu")
    task = results["tasks"]["multiple_choice:boolq_dev"]
    labels = Counter(row.label for row in read_choice_rows(MC / "boolq_dev.jsonl", limit))
    majority = labels[1] / limit  # "yes" is the majority answer (77.5% of these rows, 62% of the file)
    assert majority > 0.6 and task["baselines"]["majority_label"] == pytest.approx(majority)
    # The bar is always answering "yes", not a coin's 50%. SmolLM2-135M-Instruct zero-shot prefers " no" and stays
    # below that bar by more than its interval: a scorer that swapped the choices would put it above.
    assert task["metrics"]["acc"]["ci95"][1] < majority
