"""Chat records in the shapes people have: every assistant turn trained, content parts, ShareGPT, TRL's
conversational prompt/completion, tool calls through the chat template, and what is refused by name."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from lorakit.train.data import IGNORE, encode, read_records
from lorakit.train.errors import DataFormatError
from tests.train.conftest import write_jsonl

# A template that renders tools and tool calls (as Llama 3's and Qwen's do, in miniature).
TOOL_TEMPLATE = (
    "{% if tools %}<s>s:tools={% for t in tools %}{{ t['function']['name'] }},{% endfor %}</s>{% endif %}"
    "{% for m in messages %}<s>{{ m['role'][0] }}:{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}call {{ c['function']['name'] }}"
    "{% for k, v in c['function']['arguments'].items() %} {{ k }}={{ v }}{% endfor %}{% endfor %}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>a:{% endif %}")

TWO_TURNS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one?"},
             {"role": "assistant", "content": "uno"}, {"role": "user", "content": "two?"},
             {"role": "assistant", "content": "dos"}]


@pytest.fixture(scope="module")
def tok(llama_dir):
    return AutoTokenizer.from_pretrained(llama_dir)


def trained(tok, record, **kw) -> str:
    sample, _ = encode(record, "chat", tok, 512, **kw)
    return tok.decode([t for t in sample.labels if t != IGNORE])


def test_every_assistant_turn_is_trained_by_default_and_the_last_one_on_request(tok):
    record = {"messages": TWO_TURNS}
    assert trained(tok, record) == "uno</s>dos</s>"
    assert trained(tok, record, last_turn_only=True) == "dos</s>"
    sample, _ = encode(record, "chat", tok, 512)
    assert tok.decode(sample.input_ids[: sample.prompt_len]).endswith("u:two?</s><s>a:")  # prompt of the last turn


def test_truncation_keeps_the_last_answer_and_the_labels_of_what_is_kept(tok):
    sample, cut = encode({"messages": TWO_TURNS}, "chat", tok, 12)  # one token per character (and special)
    assert cut and len(sample.input_ids) == 12 and tok.decode([t for t in sample.labels if t != IGNORE]) == "dos</s>"
    sample, cut = encode({"messages": TWO_TURNS}, "chat", tok, 17)
    assert cut and tok.decode([t for t in sample.labels if t != IGNORE]) == "o</s>dos</s>"  # uno's tail kept


def test_text_content_parts_are_joined(tok):
    parts = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "uno"}]}]
    plain = [{"role": "user", "content": "one\ntwo"}, {"role": "assistant", "content": "uno"}]
    assert encode({"messages": parts}, "chat", tok, 512) == encode({"messages": plain}, "chat", tok, 512)


def test_sharegpt_is_the_same_conversation(tok):
    turns = [{"from": "system", "value": "be brief"}, {"from": "human", "value": "one?"}, {"from": "gpt", "value": "uno"},
             {"from": "human", "value": "two?"}, {"from": "gpt", "value": "dos"}]
    assert encode({"conversations": turns}, "chat", tok, 512) == encode({"messages": TWO_TURNS}, "chat", tok, 512)


def test_trl_conversational_prompt_completion_trains_the_completion_only(tok):
    record = {"prompt": TWO_TURNS[:4], "completion": TWO_TURNS[4:]}
    assert trained(tok, record) == "dos</s>"
    assert encode(record, "chat", tok, 512)[0].input_ids == encode({"messages": TWO_TURNS}, "chat", tok, 512)[0].input_ids


def tool_record(arguments) -> dict:
    call = {"type": "function", "function": {"name": "weather", "arguments": arguments}}
    return {"tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
            "messages": [{"role": "user", "content": "rain?"}, {"role": "assistant", "content": None,
                                                                  "tool_calls": [call]},
                         {"role": "tool", "content": "dry"}, {"role": "assistant", "content": "no"}]}


def test_tool_calls_go_through_the_template_and_are_trained(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.chat_template = TOOL_TEMPLATE
    sample, _ = encode(tool_record({"city": "Oslo"}), "chat", tok, 512)
    assert tok.decode(sample.input_ids).startswith("<s>s:tools=weather,</s>")
    assert tok.decode([t for t in sample.labels if t != IGNORE]) == "call weather city=Oslo</s>no</s>"
    as_string = encode(tool_record('{"city": "Oslo"}'), "chat", tok, 512)[0]  # OpenAI's arguments: a JSON string
    assert as_string == sample


def test_a_template_without_tools_is_refused_by_name(tmp_path, tok):
    data = write_jsonl(tmp_path / "t.jsonl", [{"messages": TWO_TURNS}, tool_record({"city": "Oslo"})])
    records, fmt, _ = read_records(data)
    encode(records[0].data, fmt, tok, 512)
    with pytest.raises(ValueError, match="chat template does not render tools or tool calls .'weather'"):
        encode(records[1].data, fmt, tok, 512)


@pytest.mark.parametrize("record, message", [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                   {"role": "assistant", "content": "a cat"}]}, r"messages\[0\].content\[0\] is a 'image_url' part"),
    ({"conversations": [{"from": "bot", "value": "hi"}]}, r"conversations\[0\]: speaker 'from' .* got 'bot'"),
    ({"messages": [{"role": "narrator", "content": "x"}]}, r"messages\[0\]: role must be one of"),
    ({"messages": [{"role": "user", "content": "x"}]}, "the last message must be the assistant's"),
    ({"prompt": [{"role": "user", "content": "x"}], "completion": [{"role": "user", "content": "y"}]},
     "'completion' holds no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                   "tool_calls": [{"function": {"name": "f", "arguments": "{oops"}}]}]},
     r"messages\[1\]\.tool_calls\[0\]: arguments is not valid JSON"),
])
def test_bad_chat_rows_name_file_line_and_field(record, message, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": TWO_TURNS}, record])
    with pytest.raises(DataFormatError, match=rf"bad.jsonl:2: {message}"):
        read_records(data)


def test_a_template_that_rewrites_earlier_turns_says_so(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)  # drops earlier assistant turns' text, as reasoning templates do
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'][0] }}:{% if loop.last or m['role'] != 'assistant' %}"
                         "{{ m['content'] }}{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<s>a:{% endif %}")
    with pytest.raises(ValueError, match="renders messages.:2. differently .*--last-turn-only"):
        encode({"messages": TWO_TURNS}, "chat", tok, 512)
    sample, _ = encode({"messages": TWO_TURNS}, "chat", tok, 512, last_turn_only=True)
    assert tok.decode([t for t in sample.labels if t != IGNORE]) == "dos</s>"


def test_a_template_that_refuses_the_conversation_is_a_data_error(llama_dir):
    tok = AutoTokenizer.from_pretrained(llama_dir)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
                         + tok.chat_template)
    with pytest.raises(ValueError, match=r"the chat template refused messages\[:5\]: no system role"):
        encode({"messages": TWO_TURNS}, "chat", tok, 512)
