"""The built-in arithmetic task: deterministic, disjoint splits and an exact answer parser."""

import re

from lorakit.tasks import arithmetic


def _core(problem):
    return tuple(re.findall(r"\d+", problem.question)) + (problem.answer,)


def test_splits_are_deterministic():
    assert arithmetic.make_splits(200, 50, seed=3) == arithmetic.make_splits(200, 50, seed=3)
    assert arithmetic.make_splits(200, 50, seed=3) != arithmetic.make_splits(200, 50, seed=4)


def test_splits_are_disjoint_in_the_arithmetic():
    splits = arithmetic.make_splits(2000, 100)
    assert len(splits.train) == 2000 and len(splits.test) == 100
    assert not {_core(p) for p in splits.train} & {_core(p) for p in splits.test}


def test_answers_are_correct():
    for p in arithmetic.make_splits(300, 20).train:
        a, b = map(int, re.findall(r"\d+", p.question)[:2])
        assert p.answer in (a + b, a - b) and p.answer >= 0


def test_parse_answer():
    assert arithmetic.parse_answer("75") == 75
    assert arithmetic.parse_answer("So Mia has 47 + 28 = 75 marbles.") == 75
    assert arithmetic.parse_answer("1,024") == 1024
    assert arithmetic.parse_answer("no number") is None
    assert arithmetic.parse_answer("") is None
