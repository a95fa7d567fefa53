"""Records of the JSONL formats in lorakit.train.data, built from a task's questions and answers."""

from __future__ import annotations


def chat_record(question: str, answer: str, system: str | None = None) -> dict[str, list[dict[str, str]]]:
    """A one-turn chat record: the loss falls on the assistant's answer (and its end-of-turn) only."""
    messages = [{"role": "system", "content": system}] if system else []
    return {"messages": messages + [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}
