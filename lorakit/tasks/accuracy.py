"""The tasks of the reproduction table (`lorakit bench accuracy`): a model, disjoint train / validation /
test samples, a metric.

    docstrings   MiniLM-L6 (BERT, 22M) classifies stdlib docstrings into 6 module families   accuracy
                 (the role GLUE plays in the papers: a sentence-level task for an encoder)
    arithmetic   SmolLM2-135M answers two-digit word problems, greedy decoding               exact match
                 (the role GSM8K plays: a generation task whose answers are checked exactly)

Validation rows come out of the training split (by a hash of the text, or a disjoint slice of
distinct problems), so learning rates are chosen without ever looking at the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lorakit.base_models.load import load_base
from lorakit.tasks.arithmetic import make_splits, prompt_completion_record
from lorakit.tasks.docstrings import FAMILIES, docstring_rows
from lorakit.tasks.splits import in_fraction
from lorakit.train.data import Sample, encode
from lorakit.train.metrics import accuracy_f1, classify, exact_match


@dataclass(frozen=True)
class TaskData:
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    test: tuple[Sample, ...]
    pad_id: int
    tokenizer: Any
    n_labels: int = 0  # classification only


@dataclass(frozen=True)
class Task:
    """How to build a fresh model and the data, and how to score a model on samples (higher is better)."""

    name: str
    metric: str  # "accuracy" / "exact match"
    kind: str  # "classification" | "generation"
    load_model: Callable[[], tuple[nn.Module, Any]]  # a fresh (model, tokenizer); seeds set by the caller
    load_data: Callable[[Any], TaskData]  # tokenizer -> samples
    steps: int  # optimiser steps per run
    batch_size: int
    seeds: int  # seeds per chosen learning rate (the generation task is too slow on CPU for more than one)
    lrs: dict[str, tuple[float, ...]]  # learning-rate grid per method family (see accuracy_methods.FAMILY)
    description: str
    methods: tuple[str, ...] | None = None  # default methods (None: all); --methods overrides

    def score(self, model: nn.Module, data: TaskData, samples: Sequence[Sample]) -> float:
        """The task metric of `model` (as routed by the caller) on `samples`, in percent."""
        if self.kind == "classification":
            preds = classify(model, samples, data.pad_id, batch_size=64)
            return 100.0 * accuracy_f1(preds, [s.label for s in samples], data.n_labels)[0]
        return 100.0 * exact_match(model, data.tokenizer, samples, data.pad_id, batch_size=50)


# ----------------------------------------------------------------------------------------- docstrings

DOCSTRING_MAX_TOKENS = 64  # covers most first paragraphs; keeps a run near half a minute on 2 cores


def _docstring_model() -> tuple[nn.Module, Any]:
    labels = tuple(FAMILIES)
    return load_base("minilm-l6", task="classification", num_labels=len(labels), id2label=dict(enumerate(labels)),
                     label2id={n: i for i, n in enumerate(labels)})


def _docstring_data(tokenizer: Any) -> TaskData:
    labels = tuple(FAMILIES)
    train_rows, test_rows = docstring_rows()

    def samples(rows: list[dict]) -> tuple[Sample, ...]:
        return tuple(encode(r, "classification", tokenizer, DOCSTRING_MAX_TOKENS, labels)[0] for r in rows)

    val_rows = [r for r in train_rows if in_fraction(r["text"], 0.15, seed="val")]
    fit_rows = [r for r in train_rows if not in_fraction(r["text"], 0.15, seed="val")]
    return TaskData(samples(fit_rows), samples(val_rows), samples(test_rows), tokenizer.pad_token_id, tokenizer,
                    len(labels))


# Learning-rate grids: adapters with few, frozen-basis parameters (LoRA-XS, VeRA, prefixes) need larger ones.
CLASSIFICATION_LRS = {"full": (5e-5, 2e-4), "head": (3e-3, 1e-2), "lora": (5e-4, 2e-3), "small": (3e-3, 1e-2)}
# LoRA-XS and VeRA picked the top of a (2e-3, 8e-3) grid on validation and VeRA did not move off the base,
# so their grids reach further here (VeRA's scaling vectors start at 0.1 and need the largest steps)
GENERATION_LRS = {"full": (2e-5, 6e-5), "lora": (5e-4, 2e-3), "small": (2e-3, 8e-3, 3e-2), "vera": (8e-3, 3e-2, 1e-1)}

DOCSTRINGS = Task(
    name="docstrings", metric="accuracy", kind="classification", load_model=_docstring_model,
    load_data=_docstring_data, steps=100, batch_size=16, seeds=3, lrs=CLASSIFICATION_LRS,
    description="MiniLM-L6 classifies the first paragraph of stdlib docstrings into 6 module families "
                "(text, math, files, net, concurrency, containers); a classifier head is trained with every method")


# ----------------------------------------------------------------------------------------- arithmetic

ARITHMETIC_TRAIN, ARITHMETIC_VAL, ARITHMETIC_TEST = 1200, 100, 200


def _arithmetic_model() -> tuple[nn.Module, Any]:
    return load_base("smollm2-135m", task="causal-lm")


def _arithmetic_data(tokenizer: Any) -> TaskData:
    splits = make_splits(n_train=ARITHMETIC_TRAIN + ARITHMETIC_VAL, n_test=ARITHMETIC_TEST, seed=0)

    def samples(problems) -> tuple[Sample, ...]:
        return tuple(encode(prompt_completion_record(p.question, p.answer_text), "prompt_completion", tokenizer, 128)[0]
                     for p in problems)

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TaskData(samples(splits.train[:ARITHMETIC_TRAIN]), samples(splits.train[ARITHMETIC_TRAIN:]),
                    samples(splits.test), pad, tokenizer)


ARITHMETIC = Task(
    name="arithmetic", metric="exact match", kind="generation", load_model=_arithmetic_model,
    load_data=_arithmetic_data, steps=40, batch_size=16, seeds=1, lrs=GENERATION_LRS,
    methods=("lora", "lora-xs-r4", "lora-xs-r16", "vera", "qlora"),  # a CPU run's budget; --methods for all
    description="SmolLM2-135M-Instruct answers two-digit addition/subtraction word problems (\"Question: ... "
                "Answer:\"), greedy decoding, exact match; test sums never appear in training")

TASKS = {t.name: t for t in (DOCSTRINGS, ARITHMETIC)}
