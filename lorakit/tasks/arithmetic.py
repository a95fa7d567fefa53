"""A built-in task: short arithmetic word problems with one integer answer.

    "Mia has 47 marbles and buys 28 more. How many marbles does Mia have now?"  ->  75

Problems are made offline from a seed, so every machine builds the same splits. The splits are
disjoint in the arithmetic itself (the (a, op, b) triple), not just in wording: no test sum is seen
in training under another name. Answers are checked exactly after parsing the model's reply.

Two record shapes (the JSONL formats of lorakit.train.data): chat records for an instruct model
(the quickstart), `prompt_completion_record` for plain "Question: ... Answer:" prompts (the accuracy
benchmark, where the adapter teaches the answer format).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from lorakit.tasks.records import chat_record

NAMES = ("Mia", "Leo", "Ava", "Sam", "Noah", "Emma", "Liam", "Zoe", "Omar", "Lena", "Ravi", "Yuki")
ITEMS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "shells", "cards")
# (op, template): {n} name, {a} start, {b} change, {x} item
TEMPLATES = (
    ("+", "{n} has {a} {x} and buys {b} more. How many {x} does {n} have now?"),
    ("+", "{n} had {a} {x}. A friend gave {n} {b} more. How many {x} does {n} have?"),
    ("-", "{n} has {a} {x} and gives away {b}. How many {x} does {n} have left?"),
    ("-", "{n} had {a} {x} and lost {b} of them. How many {x} are left?"),
)
SYSTEM_PROMPT = "Solve the problem. Reply with the number only."


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int

    @property
    def answer_text(self) -> str:
        return str(self.answer)


@dataclass(frozen=True)
class Splits:
    train: tuple[Problem, ...]
    test: tuple[Problem, ...]


def _triples(lo: int, hi: int) -> list[tuple[int, str, int]]:
    """Every (a, op, b) with two-digit operands; subtraction keeps the result non-negative."""
    out = []
    for a in range(lo, hi + 1):
        for b in range(lo, hi + 1):
            out.append((a, "+", b))
            if a >= b:
                out.append((a, "-", b))
    return out


def make_splits(n_train: int = 2000, n_test: int = 100, seed: int = 0, lo: int = 10, hi: int = 99) -> Splits:
    """Deterministic, disjoint train/test problems: test triples never appear in train."""
    triples = _triples(lo, hi)
    if n_train + n_test > len(triples):
        raise ValueError(f"asked for {n_train + n_test} problems but only {len(triples)} distinct ones exist "
                         f"for operands {lo}..{hi}")
    rng = random.Random(seed)
    rng.shuffle(triples)
    problems = [_render(t, rng) for t in triples[: n_test + n_train]]
    return Splits(train=tuple(problems[n_test:]), test=tuple(problems[:n_test]))


def prompt_completion_record(question: str, answer: str) -> dict[str, str]:
    """A plain prompt/completion record (no chat template: the adapter teaches the answer format)."""
    return {"prompt": f"Question: {question}\nAnswer:", "completion": f" {answer}"}


def arithmetic_rows(n_train: int = 2000, n_test: int = 100, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, test) chat records of `make_splits`, for `lorakit data arithmetic`."""
    splits = make_splits(n_train, n_test, seed)
    return ([chat_record(p.question, p.answer_text, SYSTEM_PROMPT) for p in splits.train],
            [chat_record(p.question, p.answer_text, SYSTEM_PROMPT) for p in splits.test])


def _render(triple: tuple[int, str, int], rng: random.Random) -> Problem:
    a, op, b = triple
    template = rng.choice([t for o, t in TEMPLATES if o == op])
    question = template.format(n=rng.choice(NAMES), a=a, b=b, x=rng.choice(ITEMS))
    return Problem(question, a + b if op == "+" else a - b)


_INT = re.compile(r"-?\d[\d,]*")


def parse_answer(text: str) -> int | None:
    """The last integer in a reply ("So Mia has 75 marbles." -> 75), or None when there is none.

    Taking the last number is lenient to chatty replies that restate the question before answering.
    """
    numbers = _INT.findall(text)
    if not numbers:
        return None
    digits = numbers[-1].replace(",", "")
    try:
        return int(digits)
    except ValueError:  # e.g. "-" glued to a comma run
        return None
