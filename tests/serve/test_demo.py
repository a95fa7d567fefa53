"""The demo's data and training: styled answers, and a character adapter that learns them."""

from __future__ import annotations

import random

import lorakit
from lorakit.cli.demo import CHARACTERS, FACTS, poet, records, robot, train_character
from lorakit.train.data import IGNORE, encode
from tests.serve.conftest import tiny_chat_llama


def test_styles_are_recognisable():
    rng = random.Random(0)
    assert robot("water boils at 100 degrees", "kettle", rng) == "BEEP BOOP. WATER BOILS AT 100 DEGREES. END OF LINE."
    lines = poet("bees make honey", "bees", rng).split("\n")
    assert len(lines) == 2 and lines[0].startswith("Of bees I sing")
    assert CHARACTERS["pirate"]("a spider has eight legs", "spider", rng).endswith("arr! Yo ho ho!")


def test_records_are_chat_prompts_with_answers_ending_the_turn(tokenizer):
    data = records(robot)
    assert len(data) == len(FACTS)
    sample, _ = encode(data[0], "chat", tokenizer, 512)  # as lorakit.train reads it
    prompt, answer = sample.input_ids[: sample.prompt_len], sample.input_ids[sample.prompt_len:]
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.eos_token_id in answer and "BEEP BOOP" in tokenizer.decode(answer)
    assert all(x == IGNORE for x in sample.labels[: sample.prompt_len]) and sample.labels[sample.prompt_len:] == answer


def test_a_character_adapter_learns_its_style(tokenizer):
    model = tiny_chat_llama(len(tokenizer))
    losses = train_character(model, tokenizer, "robot", steps=5, lr=5e-2, rank=4)
    assert "robot" in lorakit.adapter_names(model) and not model.training
    assert losses[-1] < losses[0]
