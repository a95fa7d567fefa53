"""The chat page in headless Chromium: pick a character, send a message, watch the reply stream in, switch."""

from __future__ import annotations

import json
import os
import shutil

import httpx
import pytest

from lorakit.io import save_adapter
from lorakit.serve.app import BackgroundServer, ServeConfig, create_app, make_server
from tests.serve.conftest import greedy_alone, tiny_chat_llama, with_adapters

CHROMIUM = os.environ.get("LORAKIT_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
playwright = pytest.importorskip("playwright.sync_api")
# CI installs Debian's chromium (scripts/install_chromium.sh), so there a missing browser is a failure, not a skip
pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and os.environ.get("CI") != "true",
                                reason="no chromium binary for Playwright (scripts/install_chromium.sh installs it)")


def _launch(p):
    return p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--disable-background-networking", "--disable-component-update", "--disable-sync"])


def _reply(source, tokenizer, messages, adapter) -> str:
    """What the library generates for the chat (greedy, 96 tokens, as the page asks) under `adapter`."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer.decode(greedy_alone(source, ids, adapter, 96), skip_special_tokens=True)


def test_choose_character_chat_stream_and_switch(tokenizer, tmp_path):
    names = ["pirate", "robot"]
    source = with_adapters(tiny_chat_llama(len(tokenizer)), names)
    for name in names:
        save_adapter(source, name, tmp_path / name)
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, tmp_path,
                         config=ServeConfig(base_name="tiny", title="Test chat"))

    def reply(messages, adapter):
        return _reply(source, tokenizer, messages, adapter)

    with BackgroundServer(create_app(server)) as url, playwright.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector(".character[data-id='robot']")
            assert page.locator(".character").all_inner_texts() == ["pirate", "robot", "tiny (no adapter)"]
            page.click(".character[data-id='robot']")
            assert page.get_attribute(".character[data-id='robot']", "aria-selected") == "true"
            page.fill("#input", "Hello!")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60000)
            first = page.locator(".msg.assistant .body").nth(0).text_content()
            history = [{"role": "user", "content": "Hello!"}]
            assert first.strip() and first == reply(history, "robot")
            assert int(page.get_attribute(".msg.assistant >> nth=0", "data-chunks")) > 1  # it streamed in pieces
            # switch character mid-conversation: the pirate answers, given the whole history
            page.click(".character[data-id='pirate']")
            page.fill("#input", "Who are you?")
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='true'] >> nth=1", timeout=60000)
            second = page.locator(".msg.assistant").nth(1)
            assert second.get_attribute("data-character") == "pirate"
            assert page.locator(".msg.assistant .who").all_inner_texts() == ["robot", "pirate"]
            history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Who are you?"}]
            assert second.locator(".body").text_content() == reply(history, "pirate")
            assert server.engine.stats.requests_finished  # both went through the engine
        finally:
            browser.close()


def test_blend_two_characters_with_the_slider(tokenizer, tmp_path):
    """Move the slider to 30 % robot, talk to the blend: the answer is the API's (and the library's) for
    {"pirate": 0.7, "robot": 0.3}, and differs from the pirate's alone."""
    names = ["pirate", "robot"]
    source = with_adapters(tiny_chat_llama(len(tokenizer)), names)
    for name in names:
        save_adapter(source, name, tmp_path / name)
    server = make_server(tiny_chat_llama(len(tokenizer)), tokenizer, tmp_path, config=ServeConfig(base_name="tiny"))
    history = [{"role": "user", "content": "Hello!"}]
    with BackgroundServer(create_app(server)) as url, playwright.sync_playwright() as p:
        browser = _launch(p)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector(".character[data-id='robot']")
            assert page.is_visible("#blend")
            assert (page.input_value("#blend-a"), page.input_value("#blend-b")) == ("pirate", "robot")
            page.focus("#blend-mix")
            for _ in range(20):  # 50 % -> 30 %, as a user moves it with the keyboard
                page.keyboard.press("ArrowLeft")
            assert page.input_value("#blend-mix") == "30"
            assert page.text_content("#blend-label") == "70% pirate + 30% robot"
            page.click("#blend-use")
            assert page.get_attribute("#blend-use", "aria-pressed") == "true"
            assert page.get_attribute(".character[data-id='pirate']", "aria-selected") == "false"
            page.fill("#input", "Hello!")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=60000)
            message = page.locator(".msg.assistant").nth(0)
            sent = json.loads(message.get_attribute("data-blend"))
            answer = message.locator(".body").text_content()
        finally:
            browser.close()
        assert sent == {"pirate": 0.7, "robot": 0.3}
        assert answer.strip() and server.blend_requests == 1
        api = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "pirate", "messages": history, "max_tokens": 96, "temperature": 0, "adapter_blend": sent})
        assert api.status_code == 200, api.text
        assert answer == api.json()["choices"][0]["message"]["content"] == _reply(source, tokenizer, history, sent)
        assert answer != _reply(source, tokenizer, history, "pirate")
