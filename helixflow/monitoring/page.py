"""The live status page (``GET /``): one self-contained HTML document, no external assets.

It fetches ``api/status`` once per poll interval and redraws: each service with its state,
the platform's throughput (with a two-minute sparkline), time to first token, KV-cache usage,
and the recent errors. Text from services is set with ``textContent``, never parsed as HTML.
Elements carry ``data-*`` attributes so a browser test can read the state.
"""

from __future__ import annotations

__all__ = ["status_page"]

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>HelixFlow status</title>
<link rel="icon" href="data:,">
<style>
  :root { --bg:#0f1419; --card:#182029; --text:#e6edf3; --dim:#8b98a5; --up:#2ea043;
          --degraded:#d29922; --down:#f85149; --unknown:#6e7681; --accent:#58a6ff; }
  * { box-sizing: border-box; }
  body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
         background:var(--bg); color:var(--text); }
  header { display:flex; align-items:center; gap:16px; padding:16px 24px;
           border-bottom:1px solid #263040; }
  h1 { font-size:20px; margin:0; font-weight:600; }
  h2 { font-size:13px; text-transform:uppercase; letter-spacing:.06em; color:var(--dim);
       margin:24px 0 8px; }
  main { padding:0 24px 24px; max-width:1200px; }
  .badge { padding:2px 10px; border-radius:999px; font-weight:600; font-size:12px;
           text-transform:uppercase; color:#fff; background:var(--unknown); }
  .badge.ok, .badge.up { background:var(--up); }
  .badge.degraded { background:var(--degraded); }
  .badge.down { background:var(--down); }
  #updated { margin-left:auto; color:var(--dim); }
  #updated.stale { color:var(--down); }
  .grid { display:grid; grid-template-columns:repeat(auto-fill, minmax(250px, 1fr)); gap:12px; }
  .card { background:var(--card); border-radius:8px; padding:12px 14px; border-left:4px solid
          var(--unknown); }
  .card.up { border-left-color:var(--up); } .card.down { border-left-color:var(--down); }
  .card.degraded { border-left-color:var(--degraded); }
  .card .name { font-weight:600; font-size:16px; display:flex; justify-content:space-between; }
  .card .detail, .card .meta { color:var(--dim); font-size:12px; margin-top:4px;
                               overflow-wrap:anywhere; }
  .figure .value { font-size:24px; font-weight:600; }
  .figure .label { color:var(--dim); font-size:12px; }
  .bar { height:8px; background:#263040; border-radius:4px; margin-top:6px; overflow:hidden; }
  .bar > div { height:100%; background:var(--accent); width:0; }
  svg { width:100%; height:40px; display:block; margin-top:6px; }
  table { width:100%; border-collapse:collapse; }
  td { padding:6px 8px; border-bottom:1px solid #263040; vertical-align:top; }
  td.t { color:var(--dim); white-space:nowrap; width:1%; }
  td.level-error { color:var(--down); } td.level-warning { color:var(--degraded); }
  td.level-info { color:var(--up); }
  .empty { color:var(--dim); }
</style>
</head>
<body>
<header>
  <h1>HelixFlow</h1>
  <span id="overall" class="badge" data-status="unknown">loading</span>
  <span id="updated" data-polls="0">waiting for the first report</span>
</header>
<main>
  <h2>Services</h2>
  <div id="services" class="grid"></div>
  <h2>Traffic</h2>
  <div class="grid">
    <div class="card figure"><div class="value" id="tokens">&ndash;</div>
      <div class="label">generated tokens / s</div>
      <svg id="spark" viewBox="0 0 120 40" preserveAspectRatio="none"></svg></div>
    <div class="card figure"><div class="value" id="requests">&ndash;</div>
      <div class="label">API requests / s &middot;
        <span id="errors">&ndash;</span> errors / s</div></div>
    <div class="card figure"><div class="value" id="ttft">&ndash;</div>
      <div class="label">time to first token p50 / p95 (last minute)</div></div>
    <div class="card figure"><div class="value" id="itl">&ndash;</div>
      <div class="label">inter-token latency p50</div></div>
    <div class="card figure"><div class="value" id="queue">&ndash;</div>
      <div class="label">requests running / waiting</div></div>
    <div class="card figure"><div class="value" id="kv">&ndash;</div>
      <div class="label">KV-cache usage &middot;
        prefix-cache hits <span id="hits">&ndash;</span></div>
      <div class="bar"><div id="kvbar"></div></div></div>
  </div>
  <h2>Recent errors and recoveries</h2>
  <table><tbody id="events"><tr><td class="empty">none</td></tr></tbody></table>
</main>
<script>
"use strict";
const INTERVAL_MS = __INTERVAL_MS__;
const $ = (id) => document.getElementById(id);
const fmt = (v, digits = 1) => (v === null || v === undefined) ? "\\u2013" : v.toFixed(digits);
const ago = (t) => {
  const s = Math.max(0, Date.now() / 1000 - t);
  return s < 60 ? `${s.toFixed(0)}s` : s < 3600 ? `${(s / 60).toFixed(0)}m`
       : `${(s / 3600).toFixed(1)}h`;
};
const clock = (t) => new Date(t * 1000).toLocaleTimeString();
let lastOk = 0;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function renderServices(services) {
  const box = $("services");
  box.replaceChildren(...services.map((s) => {
    const card = el("div", `card ${s.state}`);
    card.dataset.service = s.name;
    card.dataset.state = s.state;
    const name = el("div", "name");
    name.append(el("span", "", s.name), el("span", `badge ${s.state}`, s.state));
    card.append(name, el("div", "detail", s.detail || ""),
      el("div", "meta", `${s.state} for ${ago(s.since)} · probe ${fmt(s.probe_ms)} ms · ` +
                        `${s.endpoint}${s.metrics ? "" : " · no metrics"}`));
    return card;
  }));
}

function renderSpark(history) {
  const points = history.map((h) => h.tokens_per_s || 0);
  const max = Math.max(1, ...points);
  const step = 120 / Math.max(1, points.length - 1);
  const path = points.map((v, i) => `${(i * step).toFixed(1)},${(40 - 38 * v / max).toFixed(1)}`);
  $("spark").innerHTML = points.length < 2 ? "" :
    `<polyline fill="none" stroke="#58a6ff" stroke-width="1.5" points="${path.join(" ")}"/>`;
}

function renderEvents(events) {
  const body = $("events");
  if (!events.length) {
    body.replaceChildren(el("tr", "", undefined));
    body.firstChild.append(el("td", "empty", "none"));
    return;
  }
  body.replaceChildren(...events.slice(0, 20).map((e) => {
    const row = el("tr");
    row.dataset.level = e.level;
    row.append(el("td", "t", clock(e.t)), el("td", `level-${e.level}`, e.service),
               el("td", "", e.message));
    return row;
  }));
}

function render(data) {
  const overall = $("overall");
  overall.textContent = data.status;
  overall.className = `badge ${data.status}`;
  overall.dataset.status = data.status;
  renderServices(data.services);
  const f = data.figures;
  $("tokens").textContent = fmt(f.tokens_per_s);
  $("requests").textContent = fmt(f.requests_per_s, 2);
  $("errors").textContent = fmt(f.errors_per_s, 2);
  $("ttft").textContent = f.ttft_p50_ms === null ? "\\u2013"
    : `${fmt(f.ttft_p50_ms, 0)} / ${fmt(f.ttft_p95_ms, 0)} ms`;
  $("itl").textContent = f.itl_p50_ms === null ? "\\u2013" : `${fmt(f.itl_p50_ms, 1)} ms`;
  $("queue").textContent = f.running === null ? "\\u2013" : `${f.running} / ${f.waiting}`;
  $("kv").textContent = f.kv_cache_usage === null ? "\\u2013" : `${fmt(100 * f.kv_cache_usage)}%`;
  $("kvbar").style.width = `${100 * (f.kv_cache_usage || 0)}%`;
  $("hits").textContent = f.prefix_cache_hit_rate === null ? "\\u2013"
    : `${fmt(100 * f.prefix_cache_hit_rate)}%`;
  renderSpark(data.history);
  renderEvents(data.events);
  const updated = $("updated");
  updated.dataset.polls = data.polls;
  updated.textContent = `updated ${clock(data.generated_at)} · poll ${data.polls}`;
  updated.classList.remove("stale");
}

async function refresh() {
  try {
    const reply = await fetch("api/status", {cache: "no-store"});
    if (!reply.ok) throw new Error(`HTTP ${reply.status}`);
    render(await reply.json());
    lastOk = Date.now();
  } catch (err) {
    const updated = $("updated");
    updated.classList.add("stale");
    updated.textContent = `monitor unreachable (${err.message}); last update ` +
      (lastOk ? `${ago(lastOk / 1000)} ago` : "never");
  } finally {
    setTimeout(refresh, INTERVAL_MS);
  }
}
refresh();
</script>
</body>
</html>
"""


def status_page(interval_s: float) -> bytes:
    """The page, refreshing every `interval_s` seconds."""
    return _PAGE.replace("__INTERVAL_MS__", str(max(200, int(interval_s * 1000)))).encode()
