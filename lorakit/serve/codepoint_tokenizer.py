"""A tokenizer that needs no files: one token per Unicode character, for bases with random weights.

A base built from a Llama config (lorakit.base_models.llama_config) has no tokenizer, and the server must turn
prompts into ids and ids back into streamed text without downloading one. The text such a model writes
means nothing; what matters for serving and benchmarking is that every token is one visible character
(so streaming sends one chunk per token) and that prompts of N characters cost N tokens.

    id 0: padding, 1: beginning of text, 2: unused (no end-of-text: a random model never stops early)
    id = 3 + code point for every character whose id fits the vocabulary; other characters → "?"
"""

from __future__ import annotations

from dataclasses import dataclass

SPECIALS = 3  # ids below this are special tokens
_UNKNOWN = "?"


@dataclass
class Encoding:
    input_ids: list[int]


class CodepointTokenizer:
    """`tokenizer(text).input_ids`, `decode(ids)` and `apply_chat_template` for a vocabulary of `vocab_size`."""

    pad_token_id = 0
    bos_token_id = 1
    eos_token_id = None  # random weights: no token ends a text

    def __init__(self, vocab_size: int) -> None:
        if vocab_size < SPECIALS + 128:
            raise ValueError(f"a codepoint tokenizer needs a vocabulary of at least {SPECIALS + 128} ids (ASCII), "
                             f"got {vocab_size}")
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        unknown = SPECIALS + ord(_UNKNOWN)
        ids = [SPECIALS + ord(c) if SPECIALS + ord(c) < self.vocab_size else unknown for c in text]
        return [self.bos_token_id] + ids if add_special_tokens else ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> Encoding:
        return Encoding(self.encode(text, add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """One character per id; special ids are dropped, ids that are no character (surrogates) read "?"."""
        out = []
        for i in ids:
            if i < SPECIALS:
                continue
            point = i - SPECIALS
            out.append(_UNKNOWN if 0xD800 <= point <= 0xDFFF or point > 0x10FFFF else chr(point))
        return "".join(out)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False) -> str | list[int]:
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self.encode(text) if tokenize else text
