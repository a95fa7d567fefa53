"""Question/answer tasks as chat: samples from the tokenizer's chat template, greedy answers, scores.

A problem is any object with `question: str` and `answer_text: str`; the task supplies the parser that
turns a reply into something comparable with `answer`. Problems become chat records and then samples
exactly as `lorakit train` reads chat JSONL (lorakit.train.data), so what is trained and what is scored
are one encoding: the prompt ends where the assistant's reply begins, the loss covers the answer and
its end-of-turn. Scoring right-pads (lorakit.train.collate.collate); generation left-pads the prompts.
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
from lorakit.tasks.records import chat_record
from lorakit.train.collate import left_pad
from lorakit.train.data import Sample, encode
from lorakit.train.metrics import mean_loss

MAX_LENGTH = 1024  # tokens of one problem's prompt + answer (longer ones are cut, prompt first)


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


def end_of_turn_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token to end the answer with")
    return tokenizer.eos_token_id


def pad_id(tokenizer: Any) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def make_samples(tokenizer: Any, problems: Sequence[QAProblem], system: str | None = None) -> list[Sample]:
    """One chat sample per problem: prompt (labels ignored) then answer + end of turn (labelled)."""
    return [encode(chat_record(p.question, p.answer_text, system), "chat", tokenizer, MAX_LENGTH)[0]
            for p in problems]


def prompt_ids(tokenizer: Any, question: str, system: str | None = None) -> list[int]:
    """Token ids of a one-turn chat ending where the assistant's reply begins."""
    sample = encode(chat_record(question, "", system), "chat", tokenizer, MAX_LENGTH)[0]
    return list(sample.input_ids[: sample.prompt_len])


def _route(model: nn.Module, adapter: str | None):
    """Run adapter `adapter`, or the plain base when None (also for a model with no adapters at all)."""
    if getattr(model, "lorakit_registry", None) is None:
        if adapter is not None:
            raise lorakit.AdapterNotFoundError(f"adapter {adapter!r} not attached: the model has no adapters")
        return contextlib.nullcontext()
    return lorakit.use_adapter(model, adapter) if adapter is not None else lorakit.disable_adapters(model)


@torch.no_grad()
def greedy_replies(model: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], *,
                   max_new_tokens: int = 16, batch_size: int = 32) -> list[str]:
    """Greedy replies to prompt token ids (as routed by the caller), decoded without special tokens."""
    replies: list[str] = []
    eot, pad = end_of_turn_id(tokenizer), pad_id(tokenizer)
    device = next(model.parameters()).device
    for start in range(0, len(prompts), batch_size):
        input_ids, mask = left_pad(prompts[start:start + batch_size], pad)  # (B, T) each
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eot, pad_token_id=pad)
        new = out[:, input_ids.shape[1]:]  # (B, ≤ max_new_tokens)
        replies += [r.strip() for r in tokenizer.batch_decode(new, skip_special_tokens=True)]
    return replies


def evaluate(model: nn.Module, tokenizer: Any, problems: Sequence[QAProblem], parse: Callable[[str], Any], *,
             system: str | None = None, adapter: str | None = None, max_new_tokens: int = 16,
             batch_size: int = 32) -> EvalResult:
    """Exact match of greedy replies and answer-token loss, for the base (adapter=None) or an adapter."""
    samples = make_samples(tokenizer, problems, system)
    was_training = model.training
    model.eval()
    try:
        with _route(model, adapter):
            replies = greedy_replies(model, tokenizer, [s.input_ids[: s.prompt_len] for s in samples],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size)
            loss = mean_loss(model, samples, pad_id(tokenizer), batch_size)
    finally:
        model.train(was_training)
    predictions = tuple(Prediction(p.question, p.answer, r, parse(r)) for p, r in zip(problems, replies))
    em = sum(p.correct for p in predictions) / len(predictions) if predictions else math.nan
    return EvalResult(exact_match=em, answer_loss=loss, predictions=predictions)
