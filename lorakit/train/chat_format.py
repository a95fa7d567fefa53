"""Chat records in the shapes people have, made into one conversation and rendered by the chat template.

    {"messages": [{"role", "content"}, ...]}                     content a string or a list of text parts
    {"messages": [..., {"role": "assistant", "tool_calls": [...]}, {"role": "tool", ...}], "tools": [...]}
    {"conversations": [{"from": "human" | "gpt" | ..., "value"}, ...]}          ShareGPT
    {"prompt": [messages...], "completion": [messages...]}                     TRL's conversational form

The loss is taken on every assistant turn (TRL's assistant-only loss), or on the last one only
(`last_turn_only`); of a conversational prompt/completion, only the completion's turns train.
Each assistant turn is the text the template adds after the conversation so far with a generation
prompt, so the trained tokens are exactly what the model writes when it answers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

# ShareGPT speaker -> chat role (anything else is refused by name)
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "tool": "tool", "function_response": "tool", "observation": "tool"}
ROLES = ("system", "user", "assistant", "tool")
TEXT_PART = "text"  # the one content-part type a text-only model trains on


@dataclass(frozen=True)
class Conversation:
    """Messages in the template's shape, the tools offered, and the first message whose turns train."""

    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] | None = None
    trained_from: int = 0  # assistant turns before this index are context (a conversational prompt)


def is_chat(data: dict[str, Any]) -> bool:
    return ("messages" in data or "conversations" in data
            or (isinstance(data.get("prompt"), list) and isinstance(data.get("completion"), list)))


def conversation(data: dict[str, Any]) -> Conversation:
    """The record as one conversation; ValueError naming the message and field that is wrong."""
    if "messages" in data:
        messages, trained_from = _messages(data["messages"], "messages"), 0
    elif "conversations" in data:
        messages, trained_from = _sharegpt(data["conversations"]), 0
    else:
        prompt = _messages(data["prompt"], "prompt")
        messages, trained_from = prompt + _messages(data["completion"], "completion"), len(prompt)
        if not any(m["role"] == "assistant" for m in messages[trained_from:]):
            raise ValueError("'completion' holds no assistant message: nothing to train on")
    if messages[-1]["role"] != "assistant":
        raise ValueError(f"the last message must be the assistant's answer, got role {messages[-1]['role']!r}")
    tools = data.get("tools")
    if isinstance(tools, str):
        tools = _json(tools, "'tools'")
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
        raise ValueError(f"'tools' must be a list of tool schemas (objects), got {type(tools).__name__}")
    return Conversation(tuple(messages), tuple(_drop_none(t) for t in tools) if tools else None, trained_from)


def _messages(value: Any, field: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{field!r} must be a non-empty list of messages")
    return [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ValueError(f"{where} must be an object with 'role' and 'content', got {type(m).__name__}")
    m = _drop_none(m)  # Arrow gives every message every column of the table, None where it had none
    role = m.get("role")
    if role not in ROLES:
        raise ValueError(f"{where}: role must be one of {list(ROLES)}, got {role!r}")
    out: dict[str, Any] = {**m, "role": role, "content": _content(m.get("content"), where, role, m)}
    if "tool_calls" in m:
        if role != "assistant":
            raise ValueError(f"{where}: only an assistant message makes tool calls, not a {role!r} one")
        out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(m["tool_calls"])]
    return out


def _content(content: Any, where: str, role: str, m: dict[str, Any]) -> str:
    """A string, or a list of content parts whose text is joined with newlines; other parts are refused."""
    if content is None and role == "assistant" and m.get("tool_calls"):
        return ""  # a turn that only calls tools
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: 'content' must be a string or a list of parts, got {type(content).__name__}")
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        if kind != TEXT_PART or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content[{i}] is a {kind!r} part: only text parts can be trained on")
        texts.append(part["text"])
    return "\n".join(texts)


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    """OpenAI's {"type", "function": {"name", "arguments"}} with the arguments as an object, as templates want."""
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object, got {type(call).__name__}")
    call = _drop_none(call)
    function = _drop_none(call.get("function") or {k: call[k] for k in ("name", "arguments") if k in call})
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{where} has no function name")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        arguments = _json(arguments, f"{where}: arguments")
    if not isinstance(arguments, dict):
        raise ValueError(f"{where}: arguments must be an object, got {type(arguments).__name__}")
    return {**call, "type": call.get("type", "function"),
            "function": {**function, "arguments": _drop_none(arguments)}}


def _sharegpt(turns: Any) -> list[dict[str, Any]]:
    if not isinstance(turns, list) or not turns:
        raise ValueError("'conversations' must be a non-empty list of turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{i}] needs a string 'value' and a 'from'")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise ValueError(f"conversations[{i}]: speaker 'from' must be one of {sorted(SHAREGPT_ROLES)}, "
                             f"got {turn.get('from')!r}")
        out.append({"role": role, "content": turn["value"]})
    return out


def _json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} is not valid JSON ({exc.msg} at character {exc.pos})") from None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if v is not None}


# ------------------------------------------------------------------------------------------ rendering

def segments(tokenizer: Any, conv: Conversation, last_turn_only: bool = False) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, trained) pieces: trained pieces are assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat records need a tokenizer with a chat template, and this one has none")
    msgs = list(conv.messages)
    tools = list(conv.tools) if conv.tools else None

    def render(upto: int, prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(msgs[:upto], tools=tools, add_generation_prompt=prompt,
                                                 tokenize=False)
        except TemplateError as exc:  # the template's own raise_exception: roles must alternate, ...
            raise ValueError(f"the chat template refused messages[:{upto}]: {exc}") from None

    full = render(len(msgs), False)
    _check_tools_rendered(full, conv)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant" and i >= conv.trained_from]
    if last_turn_only:
        turns = turns[-1:]
    pieces: list[tuple[str, bool]] = []
    done = 0  # characters of `full` already in pieces
    for i in turns:
        head, upto = render(i, True), render(i + 1, False)
        if not (upto.startswith(head) and full.startswith(upto) and len(head) >= done):
            raise ValueError(f"the chat template renders messages[:{i}] differently once later messages follow "
                             "(it rewrites earlier turns), so assistant turns cannot be told apart; try "
                             "--last-turn-only")
        pieces += [(full[done:len(head)], False), (full[len(head):len(upto)], True)]
        done = len(upto)
    pieces.append((full[done:], False))
    return [(text, trained) for text, trained in pieces if text]


def _check_tools_rendered(full: str, conv: Conversation) -> None:
    """A template without tool support drops tool calls in silence: refuse rather than train on less."""
    names = [c["function"]["name"] for m in conv.messages for c in m.get("tool_calls", ())]
    names += [_tool_name(t) for t in conv.tools or ()]
    missing = [n for n in names if n and n not in full]
    if missing:
        raise ValueError(f"the tokenizer's chat template does not render tools or tool calls ({missing[0]!r} is "
                         "missing from its output): use a tokenizer whose template supports tools")


def _tool_name(tool: dict[str, Any]) -> str | None:
    function = tool.get("function", tool)
    return function.get("name") if isinstance(function, dict) else None

