// gptlab chat page: plain JS, no build step, no network beyond this server.
// Replies stream over SSE read with fetch + ReadableStream (EventSource cannot POST), so "Stop" is just
// aborting the fetch: the server sees the disconnect, frees the model's slot and stores the partial answer.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = { convs: [], current: null, controller: null, busy: false, health: null, systemDraft: "", pending: [] };

const SVG = (path) => `<svg viewBox="0 0 24 24" fill="none" stroke="currentColor" stroke-width="2"
  stroke-linecap="round" stroke-linejoin="round" aria-hidden="true">${path}</svg>`;
const ICONS = {
  up: SVG('<path d="M7 10v11H3V10h4zM7 10l4-8a3 3 0 0 1 3 3v4h5.5a2 2 0 0 1 2 2.3l-1.3 8A2 2 0 0 1 18.2 21H7"/>'),
  down: SVG('<path d="M17 14V3h4v11h-4zM17 14l-4 8a3 3 0 0 1-3-3v-4H4.5a2 2 0 0 1-2-2.3l1.3-8A2 2 0 0 1 5.8 3H17"/>'),
  regen: SVG('<path d="M21 12a9 9 0 1 1-2.6-6.4M21 3v6h-6"/>'),
  copy: SVG('<rect x="9" y="9" width="12" height="12" rx="2"/><path d="M5 15V5a2 2 0 0 1 2-2h10"/>'),
};

// ----- talking to the server -------------------------------------------------------------------------
function apiKey() { return localStorage.getItem("gptlab-key") || ""; }

// The server writes a per-server token into the page; /api writes must carry it (a page on another
// site cannot read it, so it cannot forge requests here).
const CSRF = (document.querySelector('meta[name="gptlab-csrf"]') || {}).content || "";

function headers() {
  const h = { "Content-Type": "application/json", "X-CSRF-Token": CSRF };
  if (apiKey()) h.Authorization = "Bearer " + apiKey();
  return h;
}

function askKey() {
  const dialog = $("#key-dialog");
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      localStorage.setItem("gptlab-key", $("#key-input").value.trim());
      resolve();
    }, { once: true });
    dialog.showModal();
  });
}

async function errorOf(res) {
  const data = await res.json().catch(() => ({}));
  return new Error((data.error && data.error.message) || `${res.status} ${res.statusText}`);
}

// fetch that asks for an API key once when the server says 401.
async function call(path, init) {
  let res = await fetch(path, { ...init, headers: headers() });
  if (res.status === 401) {
    await askKey();
    res = await fetch(path, { ...init, headers: headers() });
  }
  if (!res.ok) throw await errorOf(res);
  return res;
}

async function api(path, method = "GET", body) {
  const res = await call(path, { method, body: body === undefined ? undefined : JSON.stringify(body) });
  return res.json();
}

// POST and hand each SSE event ({type, ...}) to onEvent as it arrives.
async function stream(path, body, onEvent, signal) {
  const res = await call(path, { method: "POST", body: JSON.stringify(body), signal });
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) onEvent(JSON.parse(line.slice(6)));
      }
    }
  }
}

// ----- settings ----------------------------------------------------------------------------------------
function settings() {
  return {
    temperature: parseFloat($("#temperature").value),
    max_tokens: Math.max(1, parseInt($("#max-tokens").value, 10) || 256),
  };
}

function loadSettings() {
  const saved = JSON.parse(localStorage.getItem("gptlab-settings") || "{}");
  if (saved.temperature !== undefined) $("#temperature").value = saved.temperature;
  if (saved.max_tokens !== undefined) $("#max-tokens").value = saved.max_tokens;
  $("#temperature-value").textContent = $("#temperature").value;
}

function saveSettings() {
  localStorage.setItem("gptlab-settings", JSON.stringify(settings()));
  $("#temperature-value").textContent = $("#temperature").value;
}

// ----- rendering ---------------------------------------------------------------------------------------
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;   // textContent: model output is never parsed as HTML
  return node;
}

function iconButton(name, cls, title, onClick) {
  const b = el("button", `icon ${cls}`);
  b.type = "button";
  b.title = title;
  b.setAttribute("aria-label", title);
  b.innerHTML = ICONS[name];
  b.addEventListener("click", onClick);
  return b;
}

function notice(text) {
  const box = $("#notice");
  box.textContent = text || "";
  box.hidden = !text;
}

function showTruncation(n) {
  if (!n) return;
  const ctx = state.health ? ` (${state.health.context_size} tokens)` : "";
  notice(`${n} earlier message${n === 1 ? "" : "s"} did not fit in the model's context window${ctx} ` +
         "and were left out of this answer.");
}

function scrollDown() {
  const box = $("#messages");
  box.scrollTop = box.scrollHeight;
}

function renderConvs() {
  const nav = $("#conversations");
  nav.replaceChildren();
  for (const c of state.convs) {
    const item = el("div", "conv-item" + (c.id === state.current ? " active" : ""));
    item.dataset.id = c.id;
    item.append(el("span", "conv-title", c.title || "New chat"));
    const del = el("button", "conv-delete", "×");
    del.type = "button";
    del.title = "Delete conversation";
    del.addEventListener("click", (e) => { e.stopPropagation(); removeConversation(c.id); });
    item.append(del);
    item.addEventListener("click", () => openConversation(c.id));
    nav.append(item);
  }
}

function addRow(role, text) {
  $("#empty").hidden = true;
  const row = el("div", `row ${role}`);
  const msg = el("div", `msg ${role}`, text);
  row.append(msg);
  $("#messages").append(row);
  scrollDown();
  return row;
}

// A tool the server ran for this answer: collapsed by default, the call in the summary, the result inside.
function addToolRun(row, run) {
  const box = el("details", "tool-run");
  box.append(el("summary", "tool-call", `${run.name} ${JSON.stringify(run.arguments)}`));
  box.append(el("pre", "tool-result", run.result));
  row.insertBefore(box, row.querySelector(".msg"));
  scrollDown();
}

function assistantActions(row, m) {
  const bar = el("div", "actions");
  const up = iconButton("up", "thumb-up" + (m.rating === 1 ? " on" : ""), "Good answer", () => rate(m, 1, bar));
  const down = iconButton("down", "thumb-down" + (m.rating === -1 ? " on" : ""), "Bad answer", () => rate(m, -1, bar));
  const regen = iconButton("regen", "regen", "Regenerate", () => regenerate(m, row));
  const copy = iconButton("copy", "copy", "Copy", () => navigator.clipboard && navigator.clipboard.writeText(m.content));
  bar.append(up, down, regen, copy);
  if (m.versions > 1) bar.append(el("span", "version", `version ${m.version} / ${m.versions}`));
  for (const b of bar.querySelectorAll("button")) b.disabled = state.busy;
  row.append(bar);
}

// Pictures shown in a user's message (data: URLs, as the server stored and returns them).
function addImages(row, urls) {
  for (const url of urls || []) {
    const img = el("img", "picture");
    img.src = url;
    img.alt = "attached picture";
    row.querySelector(".msg").prepend(img);
  }
}

// Pictures waiting to go with the next message: chosen with the paper clip or pasted into the box.
function attachFile(file) {
  if (!file || !file.type.startsWith("image/")) return;
  if (file.size > 4 * 1024 * 1024) { notice("That picture is larger than 4 MB."); return; }
  const reader = new FileReader();
  reader.onload = () => { state.pending.push(reader.result); showPending(); };
  reader.readAsDataURL(file);
}

function showPending() {
  const box = $("#attachments");
  box.replaceChildren();
  state.pending.forEach((url, i) => {
    const img = el("img", "picture pending");
    img.src = url;
    img.alt = "picture to send";
    img.title = "Click to remove";
    img.addEventListener("click", () => { state.pending.splice(i, 1); showPending(); });
    box.append(img);
  });
  box.hidden = state.pending.length === 0;
}

function renderMessage(m) {
  const row = addRow(m.role, m.content);
  row.dataset.id = m.id;
  addImages(row, m.images);
  for (const run of m.tool_runs || []) addToolRun(row, run);
  if (m.role === "assistant") {
    if (m.finish_reason === "stopped") row.querySelector(".msg").append(el("span", "stopped", m.content ? "  (stopped)" : "(stopped)"));
    assistantActions(row, m);
  }
  return row;
}

function comparePanel(onChoose) {
  $("#empty").hidden = true;
  const row = el("div", "row assistant");
  const grid = el("div", "compare");
  const sides = {};
  for (const s of ["a", "b"]) {
    const box = el("div", `side side-${s}`);
    box.append(el("div", "side-label", `ANSWER ${s.toUpperCase()}`));
    const msg = el("div", "msg assistant");
    box.append(msg);
    grid.append(box);
    sides[s] = { box, msg };
  }
  const choices = el("div", "choices");
  const buttons = [["a", "A is better"], ["tie", "About the same"], ["b", "B is better"]].map(([c, label]) => {
    const b = el("button", `choose choose-${c}`, label);
    b.type = "button";
    b.disabled = true;
    b.addEventListener("click", () => onChoose(c, buttons, sides));
    choices.append(b);
    return b;
  });
  row.append(grid, choices);
  $("#messages").append(row);
  scrollDown();
  return { row, sides, buttons };
}

function renderThread(data) {
  const box = $("#messages");
  box.replaceChildren($("#empty"));
  $("#empty").hidden = data.messages.length > 0;
  for (const m of data.messages) renderMessage(m);
  const pc = data.pending_comparison;
  if (pc) {
    const panel = comparePanel((choice, buttons, sides) => choose(pc.id, choice, buttons, sides));
    panel.sides.a.msg.textContent = pc.answer_a;
    panel.sides.b.msg.textContent = pc.answer_b;
    panel.buttons.forEach((b) => { b.disabled = false; });
  }
  scrollDown();
}

function setBusy(busy) {
  state.busy = busy;
  $("#send").hidden = busy;
  $("#stop").hidden = !busy;
  for (const b of document.querySelectorAll(".actions button")) b.disabled = busy;
}

// ----- actions -----------------------------------------------------------------------------------------
async function loadConvs() {
  state.convs = (await api("/api/conversations")).data;
  renderConvs();
}

async function openConversation(id) {
  if (state.busy) return;
  state.current = id;
  notice("");
  const data = await api(`/api/conversations/${id}`);
  $("#title").textContent = data.conversation.title || "New chat";
  $("#system-prompt").value = data.conversation.system_prompt || "";
  renderThread(data);
  renderConvs();
  const pending = !!data.pending_comparison;
  $("#input").disabled = pending;
  $("#input").placeholder = pending ? "Pick the better answer first…" : "Message the model…  (Enter to send, Shift+Enter for a new line)";
}

// After a reply the server has ids for everything; after a stop it may still be saving (poll briefly).
async function reload(waitForAnswer) {
  if (state.current == null) return;
  for (let i = 0; i < 40; i++) {
    const data = await api(`/api/conversations/${state.current}`);
    const last = data.messages[data.messages.length - 1];
    if (!waitForAnswer || !last || last.role === "assistant" || data.pending_comparison) break;
    await new Promise((r) => setTimeout(r, 50));
  }
  const keep = $("#notice").textContent;
  await openConversation(state.current);
  notice(keep);
  await loadConvs();
}

function newChat() {
  if (state.busy) return;
  state.current = null;
  $("#title").textContent = "New chat";
  $("#system-prompt").value = state.systemDraft;
  $("#messages").replaceChildren($("#empty"));
  $("#empty").hidden = false;
  $("#input").disabled = false;
  notice("");
  renderConvs();
  $("#input").focus();
}

async function removeConversation(id) {
  if (state.busy || !confirm("Delete this conversation?")) return;
  await api(`/api/conversations/${id}`, "DELETE");
  if (id === state.current) newChat();
  await loadConvs();
}

async function ensureConversation() {
  if (state.current != null) return state.current;
  const conv = await api("/api/conversations", "POST", { system_prompt: $("#system-prompt").value });
  state.current = conv.id;
  return conv.id;
}

// Run one streaming request with the Stop button armed; returns true when the user stopped it.
async function withStop(run) {
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    await run(controller.signal);
    return false;
  } catch (e) {
    if (e.name === "AbortError") return true;
    notice(e.message);
    return false;
  } finally {
    state.controller = null;
    setBusy(false);
  }
}

async function send() {
  const text = $("#input").value;
  if (!text.trim() || state.busy) return;
  const images = state.pending.slice();
  notice("");
  let id;
  try {
    id = await ensureConversation();
  } catch (e) {
    notice(e.message);
    return;
  }
  $("#input").value = "";
  autosize();
  if ($("#compare-toggle").checked && !images.length) return sendCompare(id, text);
  state.pending = [];
  showPending();
  addImages(addRow("user", text), images);
  const row = addRow("assistant", "");
  const msg = row.querySelector(".msg");
  msg.classList.add("streaming");
  const body = images.length ? { content: text, images, ...settings() } : { content: text, ...settings() };
  const stopped = await withStop((signal) => stream(`/api/conversations/${id}/messages`, body, (ev) => {
      if (ev.type === "start") { showTruncation(ev.truncated_turns); loadConvs(); }   // the new title
      else if (ev.type === "delta") { msg.textContent += ev.text; scrollDown(); }
      else if (ev.type === "tool") addToolRun(row, ev);
      else if (ev.type === "error") notice(ev.message);
    }, signal));
  msg.classList.remove("streaming");
  await reload(stopped);
}

async function regenerate(m, row) {
  if (state.busy) return;
  notice("");
  const msg = row.querySelector(".msg");
  msg.textContent = "";
  msg.classList.add("streaming");
  row.querySelector(".actions").remove();
  const stopped = await withStop((signal) => stream(`/api/messages/${m.id}/regenerate`, settings(), (ev) => {
    if (ev.type === "start") { showTruncation(ev.truncated_turns); row.querySelectorAll(".tool-run").forEach((t) => t.remove()); }
    else if (ev.type === "delta") { msg.textContent += ev.text; scrollDown(); }
    else if (ev.type === "tool") addToolRun(row, ev);
  }, signal));
  msg.classList.remove("streaming");
  await reload(stopped);
}

async function rate(m, rating, bar) {
  const value = m.rating === rating ? 0 : rating;   // clicking the same thumb again clears it
  try {
    await api(`/api/messages/${m.id}/feedback`, "POST", { rating: value });
  } catch (e) {
    notice(e.message);
    return;
  }
  m.rating = value || null;
  bar.querySelector(".thumb-up").classList.toggle("on", value === 1);
  bar.querySelector(".thumb-down").classList.toggle("on", value === -1);
}

async function sendCompare(id, text) {
  addRow("user", text);
  let comparison = null;
  const panel = comparePanel((choice, buttons, sides) => choose(comparison.id, choice, buttons, sides));
  for (const s of ["a", "b"]) panel.sides[s].msg.classList.add("streaming");
  const stopped = await withStop((signal) => stream(`/api/conversations/${id}/compare`,
    { content: text, ...settings() }, (ev) => {
      if (ev.type === "start") {
        showTruncation(ev.truncated_turns);
        if (ev.temperature !== settings().temperature) notice(`Compare samples at temperature ${ev.temperature} (two greedy answers would be identical).`);
        loadConvs();
      } else if (ev.type === "delta") { panel.sides[ev.side].msg.textContent += ev.text; scrollDown(); }
      else if (ev.type === "done") comparison = ev.comparison;
    }, signal));
  for (const s of ["a", "b"]) panel.sides[s].msg.classList.remove("streaming");
  if (stopped || !comparison) return reload(true);
  panel.buttons.forEach((b) => { b.disabled = false; });
  $("#input").disabled = true;
  $("#input").placeholder = "Pick the better answer first…";
  await loadConvs();
}

async function choose(kid, choice, buttons, sides) {
  buttons.forEach((b) => { b.disabled = true; });
  try {
    await api(`/api/comparisons/${kid}/choice`, "POST", { choice });
  } catch (e) {
    notice(e.message);
    buttons.forEach((b) => { b.disabled = false; });
    return;
  }
  if (choice !== "tie") {
    sides[choice].box.classList.add("chosen");
    sides[choice === "a" ? "b" : "a"].box.classList.add("rejected");
  }
  await new Promise((r) => setTimeout(r, 250));   // let the choice register visually
  await reload(false);
}

async function saveSystem() {
  const text = $("#system-prompt").value;
  state.systemDraft = text;
  if (state.current != null) {
    try {
      await api(`/api/conversations/${state.current}`, "PATCH", { system_prompt: text });
    } catch (e) {
      notice(e.message);
      return;
    }
  }
  $("#system-panel").hidden = true;
}

function autosize() {
  const box = $("#input");
  box.style.height = "auto";
  const full = box.scrollHeight + box.offsetHeight - box.clientHeight;   // scrollHeight omits borders
  box.style.height = Math.min(full, 200) + "px";
  box.style.overflowY = full > 200 ? "auto" : "hidden";
}

// ----- start -------------------------------------------------------------------------------------------
async function start() {
  loadSettings();
  $("#temperature").addEventListener("input", saveSettings);
  $("#max-tokens").addEventListener("change", saveSettings);
  $("#new-chat").addEventListener("click", newChat);
  $("#composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  $("#stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("#system-toggle").addEventListener("click", () => { $("#system-panel").hidden = !$("#system-panel").hidden; });
  $("#system-save").addEventListener("click", saveSystem);
  $("#input").addEventListener("input", autosize);
  $("#image-input").addEventListener("change", (e) => { for (const f of e.target.files) attachFile(f); e.target.value = ""; });
  $("#input").addEventListener("paste", (e) => {
    for (const item of (e.clipboardData && e.clipboardData.items) || []) {
      if (item.kind === "file" && item.type.startsWith("image/")) { e.preventDefault(); attachFile(item.getAsFile()); }
    }
  });
  $("#input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) state.controller.abort();
  });
  try {
    state.health = await (await fetch("/health")).json();
    $("#model-info").textContent = `model ${state.health.model} · context ${state.health.context_size} tokens`;
    $("#max-tokens").max = state.health.max_tokens_limit;
  } catch (e) {
    $("#model-info").textContent = "server unreachable";
  }
  try {
    await loadConvs();
  } catch (e) {
    notice(e.message);
  }
  $("#input").focus();
}

start();
