"""The character-chat page served at `/`: plain HTML + JS, no build step.

Characters are the server's models (/v1/models); replies stream from /v1/chat/completions. The
conversation is kept in the page, so switching character mid-conversation hands the whole history
to the new one. Two characters can also be blended: a slider sets the second one's share (0-100 %),
sent as the request's `adapter_blend` (lorakit.serve.blends). Every piece of model text goes into the
page with textContent, never as HTML.
"""

from __future__ import annotations

import html
import json

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__ · character chat</title>
<style>
  :root { --bg: #f6f5f2; --panel: #fff; --ink: #222; --muted: #777; --accent: #3a6ea5; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 15px/1.45 system-ui, sans-serif; background: var(--bg); color: var(--ink);
         display: flex; height: 100vh; }
  aside { width: 230px; padding: 16px; border-right: 1px solid #ddd; background: var(--panel); overflow-y: auto; }
  aside h1 { font-size: 17px; margin: 0 0 12px; }
  .character { display: block; width: 100%; text-align: left; padding: 8px 10px; margin: 0 0 6px;
               border: 1px solid #ddd; border-radius: 8px; background: #fafafa; cursor: pointer; font: inherit; }
  .character.selected, #blend-use.selected { border-color: var(--accent); background: #e8f0fa; font-weight: 600; }
  #blend { margin-top: 14px; padding-top: 10px; border-top: 1px solid #eee; }
  #blend h2 { font-size: 13px; margin: 0 0 6px; color: var(--muted); font-weight: 600; }
  #blend select, #blend input { width: 100%; margin: 0 0 6px; font: inherit; }
  #blend-label { font-size: 12px; color: var(--muted); margin-bottom: 6px; }
  #blend-use { display: block; width: 100%; padding: 8px 10px; border: 1px solid #ddd; border-radius: 8px;
               background: #fafafa; cursor: pointer; font: inherit; text-align: left; }
  main { flex: 1; display: flex; flex-direction: column; min-width: 0; }
  #log { flex: 1; overflow-y: auto; padding: 16px 20px; }
  .msg { max-width: 70ch; margin: 0 0 12px; padding: 8px 12px; border-radius: 10px; white-space: pre-wrap;
         word-wrap: break-word; }
  .msg.user { background: #dbe8f6; margin-left: auto; }
  .msg.assistant { background: var(--panel); border: 1px solid #e3e3e3; }
  .msg .who { display: block; font-size: 12px; color: var(--muted); margin-bottom: 2px; }
  form { display: flex; gap: 8px; padding: 12px 20px; border-top: 1px solid #ddd; background: var(--panel); }
  #input { flex: 1; padding: 9px; font: inherit; border: 1px solid #ccc; border-radius: 8px; }
  button[type=submit] { padding: 9px 16px; border: 0; border-radius: 8px; background: var(--accent); color: #fff;
                        font: inherit; cursor: pointer; }
  button:disabled { opacity: .5; cursor: default; }
  #status { font-size: 12px; color: var(--muted); margin-top: 12px; }
  #key { width: 100%; margin-top: 8px; padding: 6px; font: inherit; }
  .error { color: #b00020; }
</style>
</head>
<body>
<aside>
  <h1>__TITLE__</h1>
  <div id="characters" role="listbox" aria-label="Characters"></div>
  <div id="blend" hidden>
    <h2>Blend two characters</h2>
    <select id="blend-a" aria-label="First character"></select>
    <input id="blend-mix" type="range" min="0" max="100" step="1" value="50"
           aria-label="Share of the second character (%)">
    <select id="blend-b" aria-label="Second character"></select>
    <div id="blend-label"></div>
    <button id="blend-use" type="button" aria-pressed="false">Talk to this blend</button>
  </div>
  __KEY_INPUT__
  <div id="status">loading characters…</div>
</aside>
<main>
  <div id="log" aria-live="polite"></div>
  <form id="form">
    <input id="input" autocomplete="off" placeholder="Say something…" aria-label="Message">
    <button id="send" type="submit">Send</button>
  </form>
</main>
<script>
const BASE = __BASE__;
const state = { character: null, blending: false, messages: [], busy: false };
const $ = (id) => document.getElementById(id);

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key") ? $("key").value || localStorage.getItem("lorakit-key") : null;
  if (key) { h["Authorization"] = "Bearer " + key; localStorage.setItem("lorakit-key", key); }
  return h;
}

function label(id) { return id === BASE ? id + " (no adapter)" : id; }

function select(id) {
  state.character = id; state.blending = false;
  for (const b of document.querySelectorAll(".character")) {
    const on = b.dataset.id === id;
    b.classList.toggle("selected", on);
    b.setAttribute("aria-selected", on ? "true" : "false");
  }
  $("blend-use").classList.remove("selected"); $("blend-use").setAttribute("aria-pressed", "false");
  $("status").textContent = "talking to " + id;
}

// The blend: {first: (100 - m) / 100, second: m / 100}, m the slider's percent; one character twice is itself.
function blendWeights() {
  const a = $("blend-a").value, b = $("blend-b").value, m = Number($("blend-mix").value);
  return a === b ? { [a]: 1 } : { [a]: (100 - m) / 100, [b]: m / 100 };
}

function blendLabel() {
  return Object.entries(blendWeights()).map(([n, w]) => Math.round(w * 100) + "% " + n).join(" + ");
}

function showBlend() {
  $("blend-label").textContent = blendLabel();
  if (state.blending) $("status").textContent = "talking to the blend " + blendLabel();
}

function useBlend() {
  select($("blend-a").value);
  state.blending = true;
  for (const b of document.querySelectorAll(".character")) {
    b.classList.remove("selected"); b.setAttribute("aria-selected", "false");
  }
  $("blend-use").classList.add("selected"); $("blend-use").setAttribute("aria-pressed", "true");
  showBlend();
}

function fillBlend(adapters) {
  $("blend").hidden = adapters.length < 2;
  for (const [field, index] of [["blend-a", 0], ["blend-b", 1]]) {
    const s = $(field);
    s.textContent = "";
    for (const name of adapters) {
      const o = document.createElement("option"); o.value = name; o.textContent = name; s.appendChild(o);
    }
    if (adapters.length > index) s.value = adapters[index];
  }
  showBlend();
}

async function loadCharacters() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const ids = (await r.json()).data.map((m) => m.id);
    const box = $("characters");
    box.textContent = "";
    const ordered = ids.filter((i) => i !== BASE).concat(ids.includes(BASE) ? [BASE] : []);
    for (const id of ordered) {
      const b = document.createElement("button");
      b.className = "character"; b.type = "button"; b.dataset.id = id; b.textContent = label(id);
      b.setAttribute("role", "option");
      b.onclick = () => select(id);
      box.appendChild(b);
    }
    fillBlend(ids.filter((i) => i !== BASE));
    if (ordered.length) select(ordered[0]);
  } catch (e) { $("status").innerHTML = ""; $("status").append(errorSpan("cannot list characters: " + e.message)); }
}

function errorSpan(text) { const s = document.createElement("span"); s.className = "error"; s.textContent = text; return s; }

function addMessage(role, who) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const w = document.createElement("span"); w.className = "who"; w.textContent = who;
  const body = document.createElement("span"); body.className = "body";
  div.append(w, body);
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return body;
}

async function send(text) {
  const blend = state.blending ? blendWeights() : null;
  const character = blend ? Object.keys(blend)[0] : state.character;
  const who = blend ? "blend: " + blendLabel() : character;
  state.messages.push({ role: "user", content: text });
  addMessage("user", "you").textContent = text;
  const out = addMessage("assistant", who);
  out.parentElement.dataset.character = who;
  if (blend) out.parentElement.dataset.blend = JSON.stringify(blend);
  state.busy = true; $("send").disabled = true;
  let reply = "";
  try {
    const request = { model: character, messages: state.messages, stream: true, max_tokens: 96, temperature: 0 };
    if (blend) request.adapter_blend = blend;
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
      body: JSON.stringify(request) });
    if (!r.ok) throw new Error((await r.json()).error.message);
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const line = buffer.slice(0, cut).trim(); buffer = buffer.slice(cut + 2);
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") continue;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message);
        const piece = event.choices[0].delta.content || "";
        reply += piece; out.textContent = reply;
        out.parentElement.dataset.chunks = String(Number(out.parentElement.dataset.chunks || 0) + 1);
        $("log").scrollTop = $("log").scrollHeight;
      }
    }
    out.parentElement.dataset.done = "true";
    state.messages.push({ role: "assistant", content: reply });
  } catch (e) {
    out.append(errorSpan(" [" + e.message + "]"));
    out.parentElement.dataset.done = "error";
    state.messages.pop();
  } finally {
    state.busy = false; $("send").disabled = false; $("input").focus();
  }
}

$("form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy || !state.character) return;
  $("input").value = "";
  send(text);
});
for (const id of ["blend-a", "blend-b", "blend-mix"]) $(id).addEventListener("input", showBlend);
$("blend-use").onclick = useBlend;
if ($("key")) { $("key").value = localStorage.getItem("lorakit-key") || ""; $("key").onchange = loadCharacters; }
loadCharacters();
</script>
</body>
</html>
"""


def render_page(title: str, base_name: str, needs_key: bool) -> str:
    key_input = ('<input id="key" type="password" placeholder="API key" aria-label="API key">' if needs_key else "")
    return (_PAGE.replace("__TITLE__", html.escape(title)).replace("__BASE__", json.dumps(base_name).replace("<", "\\u003c"))
            .replace("__KEY_INPUT__", key_input))
