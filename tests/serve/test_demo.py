"""The demo's data and training: styled answers, and a character adapter that learns them."""

from __future__ import annotations

import random

import lorakit
from lorakit.serve.demo import CHARACTERS, FACTS, examples, poet, robot, train_character
from tests.serve.conftest import tiny_chat_llama


def test_styles_are_recognisable():
    rng = random.Random(0)
    assert robot("water boils at 100 degrees", "kettle", rng) == "BEEP BOOP. WATER BOILS AT 100 DEGREES. END OF LINE."
    lines = poet("bees make honey", "bees", rng).split("\n")
    assert len(lines) == 2 and lines[0].startswith("Of bees I sing")
    assert CHARACTERS["pirate"]("a spider has eight legs", "spider", rng).endswith("arr! Yo ho ho!")


def test_examples_are_chat_prompts_with_answers_ending_the_turn(tokenizer):
    data = examples(tokenizer, robot)
    assert len(data) == len(FACTS)
    prompt, answer = data[0]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert answer[-1] == tokenizer.eos_token_id and "BEEP BOOP" in tokenizer.decode(answer)


def test_a_character_adapter_learns_its_style(tokenizer):
    model = tiny_chat_llama(len(tokenizer))
    losses = train_character(model, tokenizer, "robot", steps=5, lr=5e-2, rank=4)
    assert "robot" in lorakit.adapter_names(model) and not model.training
    assert losses[-1] < losses[0]
