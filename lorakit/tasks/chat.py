"""Question/answer tasks as chat: prompts from the tokenizer's chat template, greedy answers, scores.

A problem is any object with `question: str` and `answer_text: str`; the task supplies the parser that
turns a reply into something comparable with `answer`. The answer the model is trained on is
`answer_text` followed by the end-of-turn token, and the loss is taken on those tokens only.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

import lorakit
from lorakit.train_loop import Example, answer_loss, collate


class QAProblem(Protocol):
    question: str
    answer: Any

    @property
    def answer_text(self) -> str: ...


@dataclass(frozen=True)
class Prediction:
    question: str
    answer: Any  # the correct answer
    reply: str  # what the model wrote (special tokens removed)
    parsed: Any  # the reply parsed by the task, None when unparsable

    @property
    def correct(self) -> bool:
        return self.parsed is not None and self.parsed == self.answer


@dataclass(frozen=True)
class EvalResult:
    exact_match: float  # fraction of problems whose parsed greedy reply equals the answer
    answer_loss: float  # mean negative log-likelihood per answer token (teacher-forced)
    predictions: tuple[Prediction, ...]


def prompt_ids(tokenizer: Any, question: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat ending where the assistant's reply begins."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def end_of_turn_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token to end the answer with")
    return tokenizer.eos_token_id


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def make_examples(tokenizer: Any, problems: Sequence[QAProblem], system: str | None = None) -> list[Example]:
    eot = end_of_turn_id(tokenizer)
    return [Example(tuple(prompt_ids(tokenizer, p.question, system)),
                    tuple(tokenizer(p.answer_text, add_special_tokens=False).input_ids) + (eot,))
            for p in problems]


def _route(model: nn.Module, adapter: str | None):
    """Run adapter `adapter`, or the plain base when None (also for a model with no adapters at all)."""
    if getattr(model, "lorakit_registry", None) is None:
        if adapter is not None:
            raise lorakit.AdapterNotFoundError(f"adapter {adapter!r} not attached: the model has no adapters")
        return contextlib.nullcontext()
    return lorakit.use_adapter(model, adapter) if adapter is not None else lorakit.disable_adapters(model)


@torch.no_grad()
def greedy_replies(model: nn.Module, tokenizer: Any, questions: Sequence[str], *, system: str | None = None,
                   adapter: str | None = None, max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy replies, decoded without special tokens, in the order of `questions`."""
    replies: list[str] = []
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        with _route(model, adapter):
            for start in range(0, len(questions), batch_size):
                chunk = [Example(tuple(prompt_ids(tokenizer, q, system)), ()) for q in questions[start:start + batch_size]]
                batch = collate(chunk, pad)
                out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                     max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot,
                                     pad_token_id=pad)
                new = out[:, batch["input_ids"].shape[1]:]  # (B, ≤ max_new_tokens)
                replies += [r.strip() for r in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
        model.train(was_training)
    return replies


@torch.no_grad()
def mean_answer_loss(model: nn.Module, examples: Sequence[Example], *, pad: int, adapter: str | None = None,
                     batch_size: int = 32) -> float:
    """Teacher-forced mean negative log-likelihood per answer token."""
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with _route(model, adapter):
            for start in range(0, len(examples), batch_size):
                nll, n = answer_loss(model, collate(examples[start:start + batch_size], pad))
                total, count = total + nll.item(), count + n
    finally:
        model.train(was_training)
    return total / count if count else math.nan


def evaluate(model: nn.Module, tokenizer: Any, problems: Sequence[QAProblem], parse: Callable[[str], Any], *,
             system: str | None = None, adapter: str | None = None, max_new_tokens: int = 16,
             batch_size: int = 32) -> EvalResult:
    """Exact match of greedy replies and answer-token loss, for the base (adapter=None) or an adapter."""
    replies = greedy_replies(model, tokenizer, [p.question for p in problems], system=system, adapter=adapter,
                             max_new_tokens=max_new_tokens, batch_size=batch_size)
    predictions = tuple(Prediction(p.question, p.answer, r, parse(r)) for p, r in zip(problems, replies))
    loss = mean_answer_loss(model, make_examples(tokenizer, problems, system), pad=pad_id(tokenizer),
                            adapter=adapter, batch_size=batch_size)
    em = sum(p.correct for p in predictions) / len(predictions) if predictions else math.nan
    return EvalResult(exact_match=em, answer_loss=loss, predictions=predictions)
