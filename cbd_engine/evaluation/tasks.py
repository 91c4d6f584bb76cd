"""Task readers and prompts (torch-free): the JSONL schemas of shared/data/README.md, in lm-evaluation-harness's
prompt conventions.

Multiple choice (one request per choice, scored by log P(continuation | context)):
- context and question (BoolQ):   "{context}\\nQuestion: {question}?\\nAnswer:"  + " " + choice
- question only (ARC, MMLU):      "Question: {question}\\nAnswer:"               + " " + choice
- context only (HellaSwag):       "{context}"                                     + " " + choice
- partial scoring (WinoGrande, rows with `continuation`): each choice is its own context, scored on
  " " + continuation, so only the part the choices share is compared.
Rows with a `subject` (MMLU) open with the harness's `mmlu_continuation` description, and k-shot examples come from
the same subject. The few-shot pool never contains the scored row.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cbd_engine.data.rows import InstructionRow

FEWSHOT_DELIMITER = "\n\n"
TARGET_DELIMITER = " "
# The paper's summarization instruction (appendix B); XSum rows carry no title, so it is left out when absent.
SUMMARY_INSTRUCTION = (
    "Given the following article, and the title of the article is {title}, please summarize the article."
)
SUMMARY_INSTRUCTION_NO_TITLE = "Given the following article, please summarize the article."


@dataclass(frozen=True)
class ChoiceRow:
    choices: tuple[str, ...]
    label: int
    question: str = ""
    context: str = ""
    continuation: str | None = None  # set: partial scoring (WinoGrande)
    subject: str | None = None  # set: MMLU

    def query(self) -> str:
        """The text before the answer of a non-partial row."""
        if self.context and self.question:
            question = self.question if self.question.endswith("?") else self.question + "?"
            return f"{self.context}\nQuestion: {question}\nAnswer:"
        if self.question:
            return f"Question: {self.question.strip()}\nAnswer:"
        return self.context

    def requests(self) -> list[tuple[str, str]]:
        """(context, continuation) per choice, in choice order."""
        if self.continuation is not None:
            return [(choice, TARGET_DELIMITER + self.continuation) for choice in self.choices]
        return [(self.query(), TARGET_DELIMITER + choice) for choice in self.choices]

    def answered(self) -> str:
        """The row with its gold answer, as a few-shot example."""
        context, continuation = self.requests()[self.label]
        return context + continuation

    def scored_lengths(self) -> list[int]:
        """Characters of each scored continuation (without the delimiter): acc_norm's divisor, as in the harness."""
        if self.continuation is not None:
            return [len(self.continuation)] * len(self.choices)
        return [len(choice) for choice in self.choices]


def jsonl_records(path: str | Path, limit: int | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) for the first `limit` non-blank lines; a clear error names a line that is not JSON."""
    count = 0
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if limit is not None and count >= limit:
                return
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error})") from None
            count += 1


def read_choice_rows(path: str | Path, limit: int | None = None) -> list[ChoiceRow]:
    rows = []
    for number, record in jsonl_records(path, limit):
        try:
            choices = tuple(str(choice) for choice in record["choices"])
            label = int(record["label"])
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path}:{number}: a multiple-choice row needs `choices` and `label` ({error})") from None
        if not 0 <= label < len(choices) or len(choices) < 2:
            raise ValueError(f"{path}:{number}: label {label} is not an index into {len(choices)} choices")
        if not (record.get("question") or record.get("context") or "continuation" in record):
            raise ValueError(f"{path}:{number}: a multiple-choice row needs `question`, `context` or `continuation`")
        rows.append(ChoiceRow(choices, label, str(record.get("question") or ""), str(record.get("context") or ""),
                              record.get("continuation"), record.get("subject")))
    return rows


def fewshot_context(row: ChoiceRow, pool: list[ChoiceRow], shots: int) -> str:
    """The text that precedes each of `row`'s contexts: MMLU's description and the first `shots` pool rows (same
    subject when the row has one), never `row` itself."""
    header = ""
    if row.subject:
        header = f"The following are questions (with answers) about {row.subject.replace('_', ' ')}.\n\n"
    if shots <= 0:
        return header
    examples = [other for other in pool if other != row and (row.subject is None or other.subject == row.subject)]
    return header + "".join(example.answered() + FEWSHOT_DELIMITER for example in examples[:shots])


def choice_requests(rows: list[ChoiceRow], pool: list[ChoiceRow], shots: int) -> list[tuple[str, str]]:
    """All (context, continuation) requests of `rows`, row by row, choice by choice."""
    requests = []
    for row in rows:
        prefix = fewshot_context(row, pool, shots)
        requests.extend((prefix + context, continuation) for context, continuation in row.requests())
    return requests


def read_summarization_rows(path: str | Path, limit: int | None = None) -> list[InstructionRow]:
    """Summarization rows as instruction rows in the paper's template: the article is the input, the summary the
    reference output."""
    rows = []
    for number, record in jsonl_records(path, limit):
        if "document" not in record or "summary" not in record:
            raise ValueError(f"{path}:{number}: a summarization row needs `document` and `summary`")
        title = record.get("title")
        instruction = SUMMARY_INSTRUCTION.format(title=title) if title else SUMMARY_INSTRUCTION_NO_TITLE
        rows.append(InstructionRow(instruction, str(record["document"]), str(record["summary"])))
    return rows
