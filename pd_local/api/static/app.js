// The pd_local web page: a streaming chat over /v1/chat/completions and a live view of the
// ranks from /v1/cluster. No framework, no build step; every model string goes through
// renderMarkdown (escaped) or textContent.
"use strict";

const KEY_STORAGE = "pd_local.api_key";
const PHASES = [ // timings_ms keys, in the order a request meets them
  ["reserve_wait", "reserve"], ["queue", "queue"], ["prefill", "prefill"],
  ["kv_transfer", "KV transfer"], ["first_decode", "first decode"], ["decode", "decode"],
];
const POLL_MS = 1000;

const $ = (id) => document.getElementById(id);
const state = {
  history: [], // {role, content} of finished turns
  key: sessionStorage.getItem(KEY_STORAGE),
  keyRequired: false,
  controller: null, // the AbortController of the answer being streamed
  pollTimer: null,
};

class AuthError extends Error {}

function headers() {
  const h = {"content-type": "application/json"};
  if (state.key) h.authorization = "Bearer " + state.key;
  return h;
}

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

async function errorText(res) {
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (e) { /* not JSON */ }
  return `HTTP ${res.status}`;
}

// -- API key --------------------------------------------------------------------------------

function askKey(message) {
  $("key-error").textContent = message || "";
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

function setKey(key) {
  state.key = key || null;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("forget-key").hidden = !key;
}

// -- cluster view ---------------------------------------------------------------------------

async function pollCluster() {
  clearTimeout(state.pollTimer);
  try {
    const res = await fetch("/v1/cluster", {headers: headers()});
    if (res.status === 401) {
      setKey(null);
      askKey(state.keyRequired ? "The server refused this key." : "");
      setStatus("API key needed", "bad");
      return; // polling resumes once a key is given
    }
    if (!res.ok) throw new Error(await errorText(res));
    renderCluster(await res.json());
  } catch (e) {
    setStatus("unreachable: " + e.message, "bad");
  }
  state.pollTimer = setTimeout(pollCluster, POLL_MS);
}

function setStatus(text, kind) {
  const s = $("status");
  s.textContent = text;
  s.className = "status " + (kind || "");
}

function fmt(n, digits) {
  return Number(n).toLocaleString("en-US", {maximumFractionDigits: digits || 0});
}

function kvBar(kv) {
  const bar = el("div", "kvbar");
  bar.title = `KV blocks: ${kv.used} used, ${kv.cached} cached, ${kv.free} free of ${kv.total}`;
  for (const part of ["used", "cached", "free"]) {
    const seg = el("span", part);
    seg.style.flexGrow = String(kv[part]);
    bar.append(seg);
  }
  return bar;
}

function renderCluster(c) {
  $("model").textContent = c.model;
  setStatus(c.status === "ok" ? c.detail : "unavailable: " + c.detail, c.status === "ok" ? "ok" : "bad");
  $("in-flight").textContent = `${c.in_flight} in flight`;
  const cards = c.ranks.map((r) => {
    const card = el("div", "rank role-" + r.role);
    card.dataset.rank = r.rank;
    card.dataset.role = r.role;
    card.dataset.mode = r.mode || "";  // elastic ranks: mixed, prefill or decode
    const head = el("div", "rank-head");
    head.append(el("strong", "", `rank ${r.rank}`), el("span", "badge", r.mode ? `${r.role} · ${r.mode}` : r.role));
    const rows = el("dl");
    const row = (k, v) => rows.append(el("dt", "", k), el("dd", "", v));
    row("running / waiting", `${r.running} / ${r.waiting}`);
    if (r.role === "prefill" || r.role === "elastic") row("queued prompt tokens", fmt(r.queued_prefill_tokens));
    if (r.role !== "decode") row("prefill tok/s", fmt(r.prefill_tokens_per_s, 1));
    if (r.role !== "prefill") row("decode tok/s", fmt(r.decode_tokens_per_s, 1));
    if (r.threads) row("threads", `${r.threads} on CPUs ${r.cpus}`);
    const kv = r.kv_blocks;
    const kvText = el("div", "kv-text", `KV blocks: ${kv.used} used · ${kv.cached} cached · ${kv.free} free`);
    card.append(head, rows, kvBar(kv), kvText);
    return card;
  });
  $("ranks").replaceChildren(...cards);
  const t = c.kv_transfer;
  $("kv-transfer").textContent = t.count
    ? `KV moved prefill → decode: ${fmt(t.count)} transfers, ${fmt(t.bytes / 1e6, 1)} MB` : "";
}

// -- chat -----------------------------------------------------------------------------------

function addMessage(role, text) {
  const m = el("div", "msg " + role);
  const body = el("div", "body");
  if (role === "user") body.textContent = text;
  else body.innerHTML = renderMarkdown(text);
  m.append(body);
  $("messages").append(m);
  m.scrollIntoView({block: "end"});
  return m;
}

function timeline(ext, usage) {
  const t = (ext && ext.timings_ms) || {};
  const box = el("div", "timeline");
  const bar = el("div", "tl-bar");
  for (const [key, label] of PHASES) {
    if (!(t[key] > 0)) continue;
    const seg = el("span", "tl-" + key);
    seg.style.flexGrow = String(t[key]);
    seg.title = `${label}: ${fmt(t[key], 1)} ms`;
    seg.dataset.phase = key;
    bar.append(seg);
  }
  const facts = [];
  if (ext && ext.prefill_rank != null) {
    facts.push(ext.prefill_rank === ext.decode_rank
      ? `prefill + decode on rank ${ext.decode_rank}`
      : `prefill rank ${ext.prefill_rank} → decode rank ${ext.decode_rank}`);
  }
  if (t.ttft != null) facts.push(`TTFT ${fmt(t.ttft)} ms`);
  if (t.kv_transfer != null) facts.push(`KV ${fmt(t.kv_transfer, 1)} ms`);
  const n = usage ? usage.completion_tokens : 0;
  if (n > 1 && t.decode > 0) facts.push(`${fmt((n - 1) / (t.decode / 1000), 1)} tok/s`);
  if (usage) facts.push(`${n} tokens`);
  const legend = el("div", "tl-legend");
  for (const [key, label] of PHASES) {
    if (t[key] > 0) {
      const item = el("span", "tl-item");
      item.append(el("span", "sw tl-" + key), document.createTextNode(`${label} ${fmt(t[key], 1)} ms`));
      legend.append(item);
    }
  }
  box.append(bar, el("div", "tl-facts", facts.join(" · ")), legend);
  return box;
}

// Yields the JSON objects of an SSE response body until `data: [DONE]`.
async function* sseObjects(res) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buf += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buf.search(/\r?\n\r?\n/)) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({role: "system", content: system});
  messages.push(...state.history);
  const body = {messages, stream: true, stream_options: {include_usage: true}};
  const temperature = parseFloat($("temperature").value);
  if (!Number.isNaN(temperature)) body.temperature = temperature;
  const maxTokens = parseInt($("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  return body;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("new-chat").disabled = busy;
}

async function send() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  if (state.keyRequired && !state.key) { askKey(""); return; }
  $("input").value = "";
  state.history.push({role: "user", content: text});
  addMessage("user", text);
  const msg = addMessage("assistant", "");
  msg.classList.add("streaming");
  const body = msg.querySelector(".body");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let answer = "", ext = null, usage = null, finish = null, failure = null, pending = false;
  const paint = () => { pending = false; body.innerHTML = renderMarkdown(answer); };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (res.status === 401) throw new AuthError(await errorText(res));
    if (!res.ok) throw new Error(await errorText(res));
    for await (const obj of sseObjects(res)) {
      if (obj.error) throw new Error(obj.error.message);
      const choice = obj.choices && obj.choices[0];
      if (choice && choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        if (!pending) { pending = true; requestAnimationFrame(paint); }
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (obj.usage) usage = obj.usage;
      if (obj.pd_local) ext = obj.pd_local;
    }
  } catch (e) {
    failure = e;
  } finally {
    state.controller = null;
    setBusy(false);
    msg.classList.remove("streaming");
  }
  paint();
  if (failure instanceof AuthError) {
    state.history.pop();
    msg.previousSibling.remove();
    msg.remove();
    $("input").value = text;
    setKey(null);
    askKey("The server refused this key.");
    return;
  }
  if (answer) state.history.push({role: "assistant", content: answer});
  else state.history.pop(); // nothing came back: the next turn should not see a dangling question
  msg.dataset.finish = failure ? (failure.name === "AbortError" ? "stopped" : "error") : (finish || "stop");
  if (failure && failure.name === "AbortError") {
    msg.append(el("div", "note", "stopped"));
  } else if (failure) {
    msg.append(el("div", "note error", "error: " + failure.message));
  } else {
    msg.append(timeline(ext, usage));
  }
  msg.scrollIntoView({block: "end"});
}

function stop() {
  if (state.controller) state.controller.abort(); // closes the stream: the server aborts and frees the KV
}

// -- start ----------------------------------------------------------------------------------

async function start() {
  $("composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", () => { state.history = []; $("messages").replaceChildren(); });
  $("forget-key").addEventListener("click", () => { setKey(null); askKey(""); });
  $("key-form").addEventListener("submit", () => { setKey($("key-input").value.trim()); pollCluster(); });
  $("forget-key").hidden = !state.key;
  try { // /health needs no key and says whether the other routes do
    const health = await (await fetch("/health")).json();
    state.keyRequired = !!health.api_key_required;
  } catch (e) { /* the cluster poll reports an unreachable server */ }
  if (state.keyRequired && !state.key) { askKey(""); setStatus("API key needed", "bad"); }
  else pollCluster();
}

start();
