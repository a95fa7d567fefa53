"""Learning-rate schedules and the data order that makes resuming and DDP exact."""

from __future__ import annotations

import math

import pytest

from lorakit.train import TrainConfig
from lorakit.train.trainer import lr_lambda, step_indices


def _factors(schedule: str, warmup: int, total: int) -> list[float]:
    config = TrainConfig(base="b", data="d", output_dir="o", schedule=schedule, warmup_steps=warmup)
    f = lr_lambda(config, total)
    return [f(s) for s in range(total)]


def test_warmup_then_decay():
    lin = _factors("linear", 2, 6)
    assert lin == pytest.approx([0.5, 1.0, 1.0, 0.75, 0.5, 0.25])
    cos = _factors("cosine", 2, 6)
    assert cos[:3] == pytest.approx([0.5, 1.0, 1.0]) and cos[4] == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)))
    assert _factors("constant", 0, 4) == [1.0] * 4


def test_every_example_once_per_epoch_and_order_is_a_function_of_step():
    n, b = 10, 4
    stream = [i for s in range(5) for i in step_indices(s, b, n, seed=3)]  # 2 epochs exactly
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:20]) == list(range(10))
    assert stream[:10] != stream[10:20]  # reshuffled each epoch
    assert step_indices(3, b, n, seed=3) == stream[12:16]
    assert step_indices(0, b, n, seed=4) != step_indices(0, b, n, seed=3)
