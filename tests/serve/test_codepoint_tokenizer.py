"""CodepointTokenizer: one token per character, text round-trips, nothing it emits breaks streaming."""

from __future__ import annotations

import pytest

from lorakit.serve.codepoint_tokenizer import SPECIALS, CodepointTokenizer


def test_text_round_trips_one_token_per_character():
    tok = CodepointTokenizer(512)
    ids = tok("héllo, wörld").input_ids
    assert ids[0] == tok.bos_token_id and len(ids) == 1 + len("héllo, wörld")
    assert tok.decode(ids) == "héllo, wörld"
    assert tok("abc", add_special_tokens=False).input_ids == [SPECIALS + 97, SPECIALS + 98, SPECIALS + 99]


def test_characters_past_the_vocabulary_read_as_a_question_mark():
    tok = CodepointTokenizer(300)
    assert tok.decode(tok("a€b").input_ids) == "a?b"  # € is code point 8364: no id in 300
    assert all(i < 300 for i in tok("a€b").input_ids)


def test_every_id_decodes_to_text_a_stream_can_send():
    tok = CodepointTokenizer(70000)  # covers the UTF-16 surrogates, which are no characters
    text = tok.decode(list(range(70000)))
    text.encode("utf-8")  # no lone surrogate
    assert len(text) == 70000 - SPECIALS and tok.eos_token_id is None


def test_chat_template_and_a_too_small_vocabulary():
    tok = CodepointTokenizer(512)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False) == "user: hi\nassistant: "
    with pytest.raises(ValueError, match="at least 131"):
        CodepointTokenizer(100)
