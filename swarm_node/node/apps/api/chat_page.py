"""The chat page served at ``/chat``: one self-contained HTML document (no CDN, no build step).

Its script talks to ``/v1/chat/completions`` with streaming like any OpenAI client and reads the
final chunk's ``swarm`` field (engine.swarm_report) to show which server ran which blocks. Model
output and every error message are inserted as text (``textContent`` / text nodes), never as HTML;
``HEADERS``' content security policy runs no script but the page's own (by its hash) and lets it
reach nothing but this API.
"""

import base64
import hashlib

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>swarm-node chat</title>
<style>
  :root { --bg:#0f1419; --card:#182029; --line:#2a3642; --text:#e6edf3; --dim:#8b9bab; --accent:#58a6ff;
          --bad:#e5534b; --warn:#d4a72c; --good:#3fb950; --user:#1f3a5c; }
  * { box-sizing: border-box; }
  html, body { height:100%; }
  body { margin:0; background:var(--bg); color:var(--text); display:flex; flex-direction:column;
         font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif; }
  header { padding:10px 16px; border-bottom:1px solid var(--line); display:flex; flex-wrap:wrap; align-items:center; gap:8px 16px; }
  header h1 { margin:0; font-size:18px; } a { color:var(--accent); }
  header .grow { flex:1; }
  select, input, textarea, button { font:inherit; font-size:16px; color:var(--text); background:var(--card);
         border:1px solid var(--line); border-radius:6px; padding:6px 10px; }
  :focus-visible { outline:2px solid var(--accent); outline-offset:2px; }
  button { cursor:pointer; } button:disabled { opacity:.45; cursor:default; }
  button.primary { background:#1f6feb; border-color:#1f6feb; }
  details.settings { width:100%; } details.settings summary { cursor:pointer; color:var(--dim); }
  .fields { display:flex; flex-wrap:wrap; gap:10px 18px; padding:8px 0 2px; }
  .fields label { display:flex; flex-direction:column; font-size:12px; color:var(--dim); gap:2px; }
  .fields input { width:9em; }
  #log { flex:1; overflow-y:auto; padding:12px 16px; display:flex; flex-direction:column; gap:12px; }
  .msg { max-width:52rem; width:100%; margin:0 auto; background:var(--card); border:1px solid var(--line);
         border-radius:8px; padding:8px 12px; }
  .msg.user { background:var(--user); }
  .who { font-size:12px; color:var(--dim); }
  .content { white-space:pre-wrap; overflow-wrap:anywhere; }
  .meta { font-size:12px; color:var(--dim); margin-top:6px; display:flex; flex-wrap:wrap; gap:4px 12px; }
  .chain { display:flex; flex-wrap:wrap; gap:4px; align-items:center; }
  .hop { border:1px solid var(--accent); border-radius:4px; padding:0 6px; font-family:ui-monospace,Menlo,monospace; }
  .hop.replaced { border-color:var(--warn); text-decoration:line-through; }
  .note { font-size:13px; margin-top:6px; color:var(--warn); }
  .error { font-size:14px; margin-top:6px; color:var(--bad); white-space:pre-wrap; }
  .empty { color:var(--dim); text-align:center; margin:auto; }
  form { border-top:1px solid var(--line); padding:10px 16px; display:flex; gap:8px; align-items:flex-end; }
  form textarea { flex:1; resize:vertical; min-height:2.6em; max-height:40vh; }
  .buttons { display:flex; gap:6px; flex-wrap:wrap; }
  .hint { font-size:12px; color:var(--dim); padding:0 16px 8px; }
  #notice:empty { display:none; } #notice { padding:8px 16px; color:var(--bad); border-bottom:1px solid var(--line); }
  @media (max-width: 600px) { form { flex-direction:column; align-items:stretch; } .buttons { justify-content:flex-end; } }
</style>
</head>
<body>
<header>
  <h1>swarm-node &middot; chat</h1>
  <label for="model" class="grow">model <select id="model" aria-label="model"></select>
    <span id="model-name"></span></label>
  <a href="./" id="map-link">swarm map</a>
  <details class="settings" id="settings"><summary>Settings</summary>
    <div class="fields">
      <label>temperature (0: greedy)<input id="temperature" type="number" min="0" max="2" step="0.1" value="0.7"></label>
      <label>top-p<input id="top-p" type="number" min="0.01" max="1" step="0.05" value="0.95"></label>
      <label>max tokens<input id="max-tokens" type="number" min="1" step="1" value="256"></label>
      <label>API key (if the API has one)<input id="api-key" type="password" autocomplete="off"></label>
    </div>
  </details>
</header>
<div id="notice" role="alert"></div>
<main id="log" aria-live="polite"><p class="empty" id="empty">Ask the swarm something.</p></main>
<form id="composer">
  <textarea id="prompt" rows="2" placeholder="Message (Enter sends, Shift+Enter: new line)" aria-label="message"></textarea>
  <div class="buttons">
    <button type="button" id="regenerate" disabled>Regenerate</button>
    <button type="button" id="stop" disabled>Stop</button>
    <button type="submit" id="send" class="primary">Send</button>
  </div>
</form>
<div class="hint">Enter: send &middot; Shift+Enter: new line &middot; Esc: stop &middot; replies show the
  time to first token, tokens/s and which server ran which blocks</div>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const short = (id) => "\\u2026" + String(id).slice(-8);
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c === null || c === undefined ? "" : (c instanceof Node ? c : String(c)));
  return node;
}

const keyFromUrl = new URLSearchParams(location.hash.slice(1)).get("key");  // /chat#key=KEY
if (keyFromUrl) $("api-key").value = keyFromUrl;
if (location.hash) $("map-link").setAttribute("href", "./" + location.hash);  // the map takes the key too
const conversation = [];  // {role, content} sent with every request
let running = null;  // the reply under way: {controller, view}
let lastView = null;  // the last reply's view (regenerate replaces it)

function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

class Problem extends Error {}

function advice(error, status) {  // an API error -> what to do about it
  const message = (error && error.message) || ("HTTP " + status);
  const code = error && error.code;
  if (status === 401 || code === "invalid_api_key")
    return "This API needs its key: enter it under Settings \\u2192 API key (or open this page as /chat#key=KEY).";
  if (code === "missing_blocks")
    return message + "\\nNo server holds these blocks right now: start one for them (swarm-node serve) or wait " +
      "for one to join, then press Regenerate. The swarm map shows which blocks are covered.";
  if (code === "swarm_error")
    return message + "\\nA server failed and no replacement worked: press Regenerate to try again.";
  if (code === "context_length_exceeded")
    return message + "\\nLower max tokens under Settings or start a new conversation (reload the page).";
  return message;
}

async function problemOf(reply) {
  let body = null;
  try { body = await reply.json(); } catch (err) { body = null; }
  return new Problem(advice(body && body.error, reply.status));
}

function showNotice(text) { $("notice").textContent = text; }

async function loadModels() {
  try {
    const reply = await fetch("v1/models", {headers: headers(), cache: "no-store"});
    if (!reply.ok) throw await problemOf(reply);
    const names = (await reply.json()).data.map((m) => m.id);
    const select = $("model");
    const chosen = select.value;
    select.replaceChildren(...names.map((n) => el("option", {value: n}, n)));
    if (names.includes(chosen)) select.value = chosen;
    select.hidden = names.length < 2;  // the picker only when there is a choice
    $("model-name").textContent = names.length === 1 ? names[0] : "";
    showNotice("");
    document.body.dataset.models = String(names.length);
  } catch (err) {
    showNotice(err instanceof Problem ? err.message : "cannot reach the API (" + err + "): is swarm-node api still running?");
    if (err instanceof Problem && /needs its key/.test(err.message)) { $("settings").open = true; $("api-key").focus(); }
  }
}

function addMessage(role, text) {
  $("empty").hidden = true;
  const content = el("div", {class: "content", "data-role": "content"}, text);
  const meta = el("div", {class: "meta", "data-role": "meta"});
  const notes = el("div", {"data-role": "notes"});
  const node = el("article", {class: "msg " + role, "data-author": role},
    el("div", {class: "who"}, role === "user" ? "you" : "swarm"), content, meta, notes);
  $("log").append(node);
  node.scrollIntoView({block: "end"});
  return {node, content, meta, notes};
}

function number(id, fallback) {
  const v = Number($(id).value);
  return $(id).value === "" || !Number.isFinite(v) ? fallback : v;
}

function drawMeta(view, r) {
  const parts = [];
  if (r.firstAt !== null) parts.push(el("span", {"data-role": "ttft"}, "first token " + ((r.firstAt - r.started) / 1000).toFixed(2) + " s"));
  const tokens = r.usage ? r.usage.completion_tokens : r.pieces;
  if (tokens) parts.push(el("span", {"data-role": "tokens"}, tokens + " token" + (tokens === 1 ? "" : "s")));
  const rate = r.swarm ? r.swarm.tokens_per_s
    : (r.pieces > 1 && r.lastAt > r.firstAt ? (r.pieces - 1) * 1000 / (r.lastAt - r.firstAt) : null);
  if (rate) parts.push(el("span", {"data-role": "rate"}, rate.toFixed(1) + " tokens/s"));
  if (r.swarm) {
    const replaced = new Set(r.swarm.recoveries.map((e) => e.failed).concat(...r.swarm.hedges.map((e) => e.late)));
    const chain = el("span", {class: "chain", "data-role": "chain"}, "chain:");
    for (const hop of r.swarm.chain) {
      chain.append(el("span", {class: "hop" + (replaced.has(hop.peer) ? " replaced" : ""), title: hop.peer,
        "data-blocks": hop.blocks, "data-peer": hop.peer}, "blocks " + hop.blocks + " @ " + short(hop.peer)));
      for (const e of r.swarm.recoveries.concat(r.swarm.hedges))
        if (e.failed === hop.peer || (e.late || []).includes(hop.peer))
          chain.append(...e.replacements.map((p) => el("span", {class: "hop", title: p, "data-blocks": e.blocks,
            "data-peer": p}, "\u2192 blocks " + e.blocks + " @ " + short(p))));
    }
    parts.push(chain);
  }
  view.meta.replaceChildren(...parts);
  if (!r.swarm) return;
  view.notes.replaceChildren(
    ...r.swarm.recoveries.map((e) => el("div", {class: "note", "data-role": "recovery"}, "\\u26a0 blocks " + e.blocks + ": server " +
        short(e.failed) + " was lost mid-reply; " + e.replacements.map(short).join(", ") + " took over in " +
        e.seconds.toFixed(2) + " s (its history was replayed: the reply goes on unchanged)")),
    ...r.swarm.hedges.map((e) => el("div", {class: "note", "data-role": "hedge"}, "blocks " + e.blocks + ": server " +
      e.late.map(short).join(", ") + " was late; spare " + e.replacements.map(short).join(", ") +
      " answered first (" + e.seconds.toFixed(2) + " s) and carried on")));
}

function setBusy(busy) {
  $("stop").disabled = !busy;
  $("send").disabled = busy;
  $("regenerate").disabled = busy || conversation.length === 0;
  $("model").disabled = busy;
}

async function reply() {
  const view = addMessage("assistant", "");
  lastView = view;
  const controller = new AbortController();
  running = {controller, view};
  view.node.dataset.state = "streaming";
  view.node.setAttribute("aria-busy", "true");
  setBusy(true);
  const r = {started: performance.now(), firstAt: null, lastAt: null, pieces: 0, usage: null, swarm: null, finish: null};
  let text = "";
  const body = {model: $("model").value, messages: conversation.slice(), stream: true,
    stream_options: {include_usage: true}, temperature: number("temperature", 1), top_p: number("top-p", 1),
    max_tokens: Math.max(1, Math.round(number("max-tokens", 256)))};
  try {
    const response = await fetch("v1/chat/completions", {method: "POST", headers: headers(),
      body: JSON.stringify(body), signal: controller.signal});
    if (!response.ok) throw await problemOf(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buffer.indexOf("\\n\\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ") || event === "data: [DONE]") continue;
        const chunk = JSON.parse(event.slice(6));
        if (chunk.error) throw new Problem(advice(chunk.error, 200));
        for (const choice of chunk.choices || []) {
          const piece = choice.delta && choice.delta.content;
          if (piece) {
            text += piece;
            view.content.textContent = text;
            r.pieces += 1;
            r.lastAt = performance.now();
            if (r.firstAt === null) r.firstAt = r.lastAt;
          }
          if (choice.finish_reason) r.finish = choice.finish_reason;
        }
        if (chunk.swarm) r.swarm = chunk.swarm;
        if (chunk.usage) r.usage = chunk.usage;
        drawMeta(view, r);
      }
    }
    view.node.dataset.state = "done";
    view.node.dataset.finish = r.finish || "";
  } catch (err) {
    if (controller.signal.aborted) {
      view.node.dataset.state = "stopped";
      view.meta.append(el("span", {"data-role": "stopped"}, "stopped"));
    } else {
      view.node.dataset.state = "error";
      const message = err instanceof Problem ? err.message
        : "the connection to the API broke (" + err + "): is swarm-node api still running? Press Regenerate to retry.";
      view.notes.append(el("div", {class: "error", "data-role": "error"}, message));
      if (/needs its key/.test(message)) { $("settings").open = true; $("api-key").focus(); }
    }
  } finally {
    view.node.removeAttribute("aria-busy");
    if (text) conversation.push({role: "assistant", content: text});
    view.node.dataset.pending = text ? "" : "1";  // nothing kept: regenerate just retries
    running = null;
    setBusy(false);
    if (document.activeElement === document.body || document.activeElement === $("stop")) $("prompt").focus();
  }
}

function send() {
  const text = $("prompt").value;
  if (running || !text.trim()) return;
  conversation.push({role: "user", content: text});
  addMessage("user", text);
  $("prompt").value = "";
  reply();
}

function regenerate() {
  if (running || conversation.length === 0) return;
  if (lastView && lastView.node.isConnected) {
    if (!lastView.node.dataset.pending && conversation[conversation.length - 1].role === "assistant") conversation.pop();
    lastView.node.remove();
  }
  reply();
}

function stop() { if (running) running.controller.abort(); }

$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) { event.preventDefault(); send(); }
});
document.addEventListener("keydown", (event) => { if (event.key === "Escape") stop(); });
$("stop").addEventListener("click", stop);
$("regenerate").addEventListener("click", regenerate);
$("api-key").addEventListener("change", loadModels);
loadModels().then(() => {
  if (document.activeElement === document.body) $("prompt").focus();
  document.body.dataset.ready = "1";
});
</script>
</body>
</html>
"""


def _script_hash(page: str) -> str:
    script = page.split("<script>", 1)[1].split("</script>", 1)[0]
    return base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()


HEADERS = {
    "content-security-policy": (
        f"default-src 'none'; script-src 'sha256-{_script_hash(PAGE)}'; "
        "style-src 'unsafe-inline'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
}
