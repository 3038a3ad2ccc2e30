// exolaunch dashboard: polls /exolaunch/stats each second, streams chat from /v1/chat/completions.
// The API key (if the cluster has one) comes from the URL fragment (#key=...) or the form, lives in
// sessionStorage and travels as a Bearer token, like any other client's.
"use strict";

const KEY = "exolaunch-api-key";
const $ = (id) => document.getElementById(id);
const state = { prev: null, rates: [], chat: [], busy: false, model: null, polls: 0, door: null };

(function takeKeyFromFragment() {
  const m = location.hash.match(/(?:^#|&)key=([^&]*)/);
  if (m) {
    sessionStorage.setItem(KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);  // keep it out of the history
  }
})();

function headers(extra) {
  const h = Object.assign({}, extra || {});
  const key = sessionStorage.getItem(KEY);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function fmt(x, digits) {
  if (x === null || x === undefined || Number.isNaN(x)) return "–";
  return Number(x).toLocaleString(undefined, { maximumFractionDigits: digits ?? 1, minimumFractionDigits: digits ?? 0 });
}
const secs = (s) => (s === null || s === undefined ? "–" : s < 1 ? fmt(s * 1000, 0) + " ms" : fmt(s, 2) + " s");
const gb = (b) => (b === null || b === undefined ? "–" : b >= 1e9 ? fmt(b / 1e9, 2) + " GB" : fmt(b / 1e6, 1) + " MB");

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

function needKey(message) {
  $("keyform").hidden = false;
  $("keyerror").textContent = message || "";
  $("state").textContent = "API key needed";
  $("state").className = "badge down";
}

async function poll() {
  let r;
  try {
    r = await fetch("/exolaunch/stats", { headers: headers(), cache: "no-store" });
  } catch (e) {
    $("state").textContent = "unreachable";
    $("state").className = "badge down";
    return;
  }
  if (r.status === 401) {
    needKey(sessionStorage.getItem(KEY) ? "that key was refused" : "");
    return false;
  }
  if (!r.ok) {
    $("state").textContent = "HTTP " + r.status;
    $("state").className = "badge down";
    return;
  }
  $("keyform").hidden = true;
  const s = await r.json();
  // Behind `run`'s front door (it marks what it relays) its own status adds the restarts.
  if (r.headers.get("x-exolaunch-served-by") && (state.polls++ % 5 === 0 || state.door === null)) {
    const d = await fetch("/exolaunch/status", { headers: headers(), cache: "no-store" });
    state.door = d.ok ? await d.json() : null;
  }
  if (state.door) s.restarts = state.door.restarts;
  render(s);
}

function render(s) {
  state.model = s.model;
  $("model").textContent = s.model;
  $("state").textContent = s.state;
  $("state").className = "badge " + s.state;
  $("uptime").textContent = "up " + fmt(s.uptime_s / 60, 1) + " min";
  $("running").textContent = s.running;
  $("waiting").textContent = s.waiting;
  $("slots").textContent = s.max_num_seqs ? "of " + s.max_num_seqs + " sequences at once" : "";
  const kv = s.kv_cache_usage;
  $("kv").textContent = kv === null ? "–" : fmt(kv * 100, 1) + " %";
  $("kvbar").style.width = kv === null ? "0" : Math.min(100, kv * 100) + "%";
  const pc = s.prefix_cache;
  $("prefix").textContent = pc && pc.queried_tokens
    ? "prefix cache: " + fmt((pc.hit_tokens / pc.queried_tokens) * 100, 1) + " % of prompt tokens hit" : "";
  $("served").textContent = fmt(s.totals.requests, 0);
  $("tokens").textContent = fmt(s.totals.prompt_tokens, 0) + " prompt / " + fmt(s.totals.generation_tokens, 0) + " generated tokens";
  const c = s.cluster;
  $("ranksup").textContent = c.ranks_up + " / " + c.world_size;
  $("backend").textContent = [c.backend, c.sharding].filter(Boolean).join(", ");
  $("restarts").textContent = s.restarts === undefined || s.restarts === null ? "–" : s.restarts;

  const prev = state.prev;
  let rate = null;
  if (prev && s.time > prev.time) rate = (s.totals.generation_tokens - prev.totals.generation_tokens) / (s.time - prev.time);
  $("toks").textContent = rate === null ? "–" : fmt(rate, 1);
  if (rate !== null) { state.rates.push(rate); if (state.rates.length > 120) state.rates.shift(); }
  spark();

  const byRank = {};
  if (prev) for (const r of prev.cluster.ranks) byRank[r.rank] = r;
  const tbody = $("ranks").tBodies[0];
  tbody.replaceChildren();
  for (const r of c.ranks) {
    const tr = document.createElement("tr");
    tr.className = "rank";
    tr.dataset.rank = r.rank;
    cell(tr, r.rank);
    cell(tr, r.host);
    cell(tr, r.shard || "–");
    cell(tr, r.up ? "up" : "down", r.up ? "up" : "down");
    const p = byRank[r.rank];
    const dn = p ? r.steps - p.steps : 0;
    cell(tr, dn > 0 ? fmt((r.step_seconds - p.step_seconds) / dn * 1000, 2) : r.last_step_seconds ? fmt(r.last_step_seconds * 1000, 2) : "–");
    cell(tr, dn > 0 && r.rank !== 0 ? fmt((r.wait_seconds - p.wait_seconds) / dn * 1000, 2) : "–");  // rank 0 decides: it never waits
    const td = cell(tr, "");
    const need = r.need_gb ? r.need_gb * 1e9 : null;
    if (need && r.rss_bytes) {
      const bar = document.createElement("div");
      bar.className = "bar" + (r.rss_bytes > need ? " over" : "");
      const fill = document.createElement("div");
      fill.style.width = Math.min(100, (r.rss_bytes / need) * 100) + "%";
      bar.appendChild(fill);
      td.appendChild(bar);
    }
    td.appendChild(document.createTextNode(gb(r.rss_bytes) + (need ? " / " + gb(need) : "")));
    cell(tr, gb(r.mlx_active_bytes));
    tbody.appendChild(tr);
  }
  $("links").textContent = c.links && c.links.length
    ? "Links: " + c.links.map((l) => `${l.a} ↔ ${l.b}: ${l.kind} (${fmt(l.gbps, 0)} Gb/s, ${fmt(l.latency_us, 0)} µs)`).join("; ")
    : "All ranks on one host (no network links).";

  const rb = $("recent").tBodies[0];
  rb.replaceChildren();
  for (const q of s.recent.slice(0, 15)) {
    const tr = document.createElement("tr");
    cell(tr, new Date(q.finished_at * 1000).toLocaleTimeString());
    cell(tr, q.dialect);
    cell(tr, q.finished_reason);
    cell(tr, q.prompt_tokens);
    cell(tr, q.generation_tokens);
    cell(tr, secs(q.queue_s));
    cell(tr, secs(q.ttft_s));
    cell(tr, fmt(q.tokens_per_s, 1));
    cell(tr, secs(q.e2e_s));
    rb.appendChild(tr);
  }
  state.prev = s;
}

function spark() {
  const cv = $("spark"), ctx = cv.getContext("2d"), v = state.rates;
  ctx.clearRect(0, 0, cv.width, cv.height);
  if (v.length < 2) return;
  const max = Math.max(1, ...v);
  ctx.strokeStyle = "#58a6ff";
  ctx.beginPath();
  v.forEach((x, i) => {
    const px = (i / (v.length - 1)) * cv.width, py = cv.height - (x / max) * (cv.height - 2) - 1;
    if (i) ctx.lineTo(px, py); else ctx.moveTo(px, py);
  });
  ctx.stroke();
}

function addMessage(who, text) {
  const div = document.createElement("div");
  div.className = "msg " + who;
  const w = document.createElement("span");
  w.className = "who";
  w.textContent = who === "user" ? "you" : state.model || "assistant";
  const t = document.createElement("span");
  t.className = "text";
  t.textContent = text;
  div.append(w, t);
  $("chat-log").appendChild(div);
  return t;
}

async function send(text) {
  state.busy = true;
  $("chat-send").disabled = true;
  state.chat.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  out.parentElement.dataset.state = "streaming";
  let answer = "";
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model: state.model || "default", messages: state.chat, stream: true, max_tokens: 128 }),
    });
    if (!r.ok) {
      let msg = "HTTP " + r.status;
      try { msg = (await r.json()).error.message || msg; } catch (e) { /* not JSON */ }
      if (r.status === 401) needKey("the chat was refused: " + msg);
      throw new Error(msg);
    }
    const reader = r.body.getReader(), dec = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i);
        buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message || "stream error");
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            answer += delta.content;
            out.textContent = answer;
            $("chat-log").scrollTop = $("chat-log").scrollHeight;
          }
        }
      }
    }
    state.chat.push({ role: "assistant", content: answer });
    out.parentElement.dataset.state = "done";
  } catch (e) {
    out.textContent = answer + " [error: " + e.message + "]";
    out.parentElement.dataset.state = "error";
    state.chat.pop();
  } finally {
    state.busy = false;
    $("chat-send").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    poll();
  });
  $("chat").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || state.busy) return;
    $("chat-input").value = "";
    send(text);
  });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat").requestSubmit(); }
  });
  poll();
  setInterval(() => { if ($("keyform").hidden) poll(); }, 1000);
});
