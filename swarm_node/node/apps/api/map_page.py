"""The swarm map page served at ``/``: one self-contained HTML document (no CDN, no build step).

Its script polls ``/api/v1/state`` and draws every model's block coverage, its servers and this API's
live generation stats. Everything from the DHT is inserted as text (``textContent``), never as HTML.
"""

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>swarm-node map</title>
<style>
  :root { --bg:#0f1419; --card:#182029; --line:#2a3642; --text:#e6edf3; --dim:#8b9bab;
          --none:#e5534b; --one:#3fb950; --two:#2ea8d8; --many:#a371f7; --warn:#d4a72c; --accent:#58a6ff; }
  * { box-sizing: border-box; }
  body { margin:0; background:var(--bg); color:var(--text); font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif; }
  header { padding:16px 24px; border-bottom:1px solid var(--line); display:flex; align-items:baseline; gap:16px; }
  header h1 { margin:0; font-size:20px; } header .dim { color:var(--dim); } header a { color:var(--accent); margin-left:auto; }
  main { padding:16px 24px; display:grid; gap:16px; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 16px; }
  .card h2 { margin:0 0 4px; font-size:16px; } .sub { color:var(--dim); margin-bottom:10px; }
  .bad { color:var(--none); font-weight:600; } .good { color:var(--one); font-weight:600; }
  .bar { display:flex; gap:2px; height:26px; margin:6px 0 2px; }
  .bar div { flex:1; border-radius:3px; min-width:3px; }
  .c0 { background:var(--none); } .c1 { background:var(--one); } .c2 { background:var(--two); } .c3 { background:var(--many); }
  .axis { display:flex; justify-content:space-between; color:var(--dim); font-size:11px; margin-bottom:8px; }
  .spans { position:relative; margin:4px 0 10px; }
  .span { position:relative; height:18px; margin:3px 0; }
  .span div { position:absolute; top:0; bottom:0; background:#26415d; border:1px solid var(--accent); border-radius:3px;
              font-size:11px; padding:0 6px; overflow:hidden; white-space:nowrap; color:var(--text); }
  table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
  th, td { text-align:left; padding:4px 8px; border-bottom:1px solid var(--line); }
  th { color:var(--dim); font-weight:500; font-size:12px; }
  code { font-family:ui-monospace,SFMono-Regular,Menlo,monospace; font-size:12px; }
  .legend span { display:inline-block; width:10px; height:10px; border-radius:2px; margin:0 4px 0 12px; }
  .stats { display:flex; gap:28px; margin-bottom:8px; } .stats b { font-size:22px; display:block; }
  .state-ONLINE { color:var(--one); } .state-JOINING { color:var(--warn); } .state-OFFLINE { color:var(--none); }
</style>
</head>
<body>
<header><h1>swarm-node &middot; swarm map</h1><span class="dim" id="updated">loading&hellip;</span>
  <a href="chat" id="chat-link">chat with the swarm &rarr;</a></header>
<main>
  <div id="models"></div>
  <section class="card" id="generation"><h2>Live generation</h2><div class="sub">this API's requests</div>
    <div class="stats">
      <div><b id="g-active">0</b>in flight</div><div><b id="g-completed">0</b>completed</div>
      <div><b id="g-failed">0</b>failed</div><div><b id="g-tokens">0</b>tokens generated</div>
    </div>
    <table><thead><tr><th>request</th><th>model</th><th>kind</th><th>prompt</th><th>new tokens</th>
      <th>first token</th><th>tokens/s</th><th>status</th></tr></thead><tbody id="g-rows"></tbody></table>
    <h2>Late hops, hedges, recoveries</h2>
    <table><thead><tr><th>when</th><th>what</th><th>blocks</th><th>server</th><th>seconds</th></tr>
      </thead><tbody id="e-rows"></tbody></table>
  </section>
</main>
<script>
"use strict";
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  for (const c of children) node.append(c === null || c === undefined ? "" : (c instanceof Node ? c : String(c)));
  return node;
}
const short = (id) => "\\u2026" + String(id).slice(-8);
const num = (x, digits) => x === null || x === undefined ? "\\u2013" : Number(x).toFixed(digits);

function modelCard(m) {
  const servers = m.servers.length;
  const status = m.missing.length
    ? el("span", {class: "bad"}, "missing blocks " + compact(m.missing))
    : el("span", {class: "good"}, "every block served");
  const card = el("section", {class: "card model", "data-model": m.model},
    el("h2", {}, m.model),
    el("div", {class: "sub"}, m.num_blocks + " blocks \\u00b7 " + servers + " server(s) \\u00b7 ", status,
       m.error ? el("span", {class: "bad"}, " \\u00b7 " + m.error) : ""));
  if (m.variants && m.variants.length)
    card.append(el("div", {class: "sub", "data-role": "variants"}, "weights by digest: " + m.variants.map((v) =>
      v.digest + (v.local ? " (this API's)" : " (other weights, not used)") + ": " + v.servers + " server(s)"
      + " (" + Object.entries(v.held_as || {}).map(([k, n]) => n + " " + k).join(", ") + ")"
      + (v.missing.length ? ", missing blocks " + compact(v.missing) : "")).join(" \\u00b7 ")));
  const bar = el("div", {class: "bar", "data-role": "coverage"});
  m.coverage.forEach((n, b) => bar.append(el("div", {class: "c" + Math.min(n, 3),
    title: "block " + b + ": " + n + " server(s), " + m.throughput[b] + " tok/s"})));
  card.append(bar, el("div", {class: "axis"}, el("span", {}, "block 0"),
    el("span", {class: "legend"}, el("span", {class: "c0"}), "none", el("span", {class: "c1"}), "1 server",
       el("span", {class: "c2"}), "2", el("span", {class: "c3"}), "3+"),
    el("span", {}, "block " + (m.num_blocks - 1))));
  const spans = el("div", {class: "spans"});
  for (const s of m.servers) {
    const left = 100 * s.start / m.num_blocks, width = 100 * (s.end - s.start) / m.num_blocks;
    spans.append(el("div", {class: "span"}, el("div", {style: "left:" + left + "%;width:" + width + "%"},
      short(s.peer_id) + "  blocks " + s.start + ":" + s.end)));
  }
  card.append(spans);
  const rows = el("tbody");
  for (const s of m.servers) {
    rows.append(el("tr", {"data-peer": s.peer_id},
      el("td", {}, el("code", {title: s.peer_id}, short(s.peer_id))), el("td", {}, s.start + ":" + s.end),
      el("td", {}, num(s.throughput, 1)), el("td", {}, s.cache_tokens_left),
      el("td", {}, s.sessions), el("td", {}, s.batch),
      el("td", {}, s.rtt_ms === null ? "unreachable" : num(s.rtt_ms, 1) + " ms"),
      el("td", {class: "state-" + s.state}, s.state), el("td", {}, s.quant === "none" ? s.dtype : s.quant),
      el("td", {}, s.version), el("td", {}, el("code", {}, s.model_digest || "-"))));
  }
  card.append(el("table", {}, el("thead", {}, el("tr", {}, ...["server", "blocks", "tokens/s", "free cache tokens", "sessions",
    "decode batch", "round trip", "state", "weights", "version", "model digest"].map((h) => el("th", {}, h)))), rows));
  return card;
}

function compact(blocks) {
  const out = []; let i = 0;
  while (i < blocks.length) { let j = i; while (j + 1 < blocks.length && blocks[j + 1] === blocks[j] + 1) j++;
    out.push(i === j ? String(blocks[i]) : blocks[i] + "-" + blocks[j]); i = j + 1; }
  return out.join(", ");
}

function drawGeneration(g) {
  document.getElementById("g-active").textContent = g.active.length;
  document.getElementById("g-completed").textContent = g.completed;
  document.getElementById("g-failed").textContent = g.failed;
  document.getElementById("g-tokens").textContent = g.tokens_generated;
  const rows = document.getElementById("g-rows");
  rows.replaceChildren();
  const line = (r, status) => el("tr", {}, el("td", {}, "#" + r.id), el("td", {}, r.model), el("td", {}, r.kind),
    el("td", {}, r.prompt_tokens), el("td", {}, r.new_tokens),
    el("td", {}, r.time_to_first_token_s === null ? "\\u2013" : num(r.time_to_first_token_s, 2) + " s"),
    el("td", {}, num(r.tokens_per_s, 1)), el("td", {}, status));
  for (const r of g.active) rows.append(line(r, "generating"));
  for (const r of g.recent) rows.append(line(r, r.error ? "failed: " + r.error : "done"));
}

const WHAT = {late: "late (no answer yet)", hedge: "hedged: answered first", recovery: "failed: replaced",
  lost: "failed: no replacement"};
function drawEvents(events) {
  document.getElementById("e-rows").replaceChildren(...events.map(e => el("tr", {},
    el("td", {}, new Date(e.at * 1000).toLocaleTimeString()), el("td", {}, WHAT[e.kind] || e.kind),
    el("td", {}, e.blocks), el("td", {}, short(e.peer)), el("td", {}, num(e.seconds, 2)))));
}

const key = new URLSearchParams(location.hash.slice(1)).get("key");  // /#key=KEY with --api-key
if (location.hash) document.getElementById("chat-link").setAttribute("href", "chat" + location.hash);
async function refresh() {
  try {
    const headers = key ? {Authorization: "Bearer " + key} : {};
    const reply = await fetch("api/v1/state", {cache: "no-store", headers});
    if (reply.status === 401) throw "this API has a key: open this page as /#key=KEY";
    const state = await reply.json();
    document.getElementById("models").replaceChildren(...state.models.map(modelCard));
    drawGeneration(state.generation);
    drawEvents(state.events);
    const age = state.refreshed_at === null ? "not yet" : new Date(state.refreshed_at * 1000).toLocaleTimeString();
    document.getElementById("updated").textContent = "DHT read at " + age + " \\u00b7 API peer " + short(state.api_peer);
    document.body.dataset.ready = "1";
  } catch (err) {
    document.getElementById("updated").textContent = "cannot reach the API: " + err;
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body>
</html>
"""
