// The tunesmith UI page: five views chosen by the URL's hash, each filled from the JSON API (app.py).
// Text from runs is always set as text; the only HTML inserted is report.html's sections, escaped by the server.
"use strict";

const $ = (id) => document.getElementById(id);
let timer = null;          // the polling of the view shown (a run's curves, a started run's log)
let conversation = [];     // the chat's messages so far

async function api(path, body) {
  const options = body === undefined ? {} :
    {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)};
  const response = await fetch(path, options);
  const data = await response.json().catch(() => ({error: {message: `HTTP ${response.status}`}}));
  if (!response.ok) throw new Error(data.error ? data.error.message : `HTTP ${response.status}`);
  return data;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function number(v) { return v === null || v === undefined ? "-" : v.toFixed(4); }

function clock(seconds) {
  if (seconds === null || seconds === undefined) return "-";
  const s = Math.round(seconds), h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
  const two = (n) => String(n).padStart(2, "0");
  return h ? `${h}:${two(m)}:${two(r)}` : `${m}:${two(r)}`;
}

function showError(message) {
  $("error").textContent = message ? `error: ${message}` : "";
  $("error").hidden = !message;
}

function status(node, state) {
  node.textContent = state;
  node.className = `status ${state}`;
}

// -- runs -------------------------------------------------------------------------------------------------------

async function runList() {
  const data = await api("/api/runs");
  $("runs-dir").textContent = data.dir;
  return data.runs;
}

async function showRuns() {
  const runs = await runList();
  const body = $("runs-table").querySelector("tbody");
  body.replaceChildren();
  for (const r of runs) {
    const row = el("tr");
    row.dataset.run = r.name;
    const link = el("a", r.name);
    link.href = `#/run/${encodeURIComponent(r.name)}`;
    const name = el("td");
    name.append(link);
    row.append(name, el("td", r.status, `status ${r.status}`), el("td", r.objective || "-"),
               el("td", r.tuning || "-"), el("td", r.metric || "-"), el("td", number(r.base), "num"),
               el("td", "->", "muted"), el("td", number(r.tuned), `num ${r.verdict || ""}`), el("td", clock(r.seconds), "num"),
               el("td", r.updated || "-", "muted"));
    body.append(row);
  }
  $("runs-empty").hidden = runs.length > 0;
  if (runs.some((r) => r.status === "running")) timer = setTimeout(showRuns, 3000);
}

async function showRun(name) {
  const data = await api(`/api/runs/${encodeURIComponent(name)}`);
  const r = data.run;
  $("run-title").textContent = r.name;
  status($("run-status"), r.status);
  $("run-report").hidden = !data.report;
  $("run-report").href = `/api/runs/${encodeURIComponent(name)}/report`;
  $("run-chat").hidden = r.status !== "completed" || !r.generates;
  $("run-chat").href = `#/chat/${encodeURIComponent(name)}`;
  const s = data.sections;
  $("run-about").innerHTML = s.about;
  $("run-line").textContent = `${r.objective || "?"} · ${r.tuning || "?"} · ${r.metric || "metric"} ` +
    `${number(r.base)} -> ${number(r.tuned)} · ${clock(r.seconds)}`;
  $("run-sections").innerHTML = [s.training, s.results, s.findings, s.data, s.confusion, s.samples].join("\n");
  if (!s.training) $("run-sections").prepend(el("p", "No curves yet: metrics.jsonl has no lines.", "muted"));
  $("run-config").textContent = data.config || "(no config.yaml)";
  $("run-card").textContent = data.data_card ? JSON.stringify(data.data_card, null, 1) : "(no data_card.json yet)";
  if (r.status === "running") timer = setTimeout(() => showRun(name).catch((e) => showError(e.message)), 2000);
}

// -- start a run ------------------------------------------------------------------------------------------------

async function showNew() {
  const select = $("example");
  if (select.options.length <= 1) {
    for (const name of (await api("/api/examples")).examples) select.append(new Option(name, name));
  }
}

async function pickExample() {
  const name = $("example").value;
  if (name) $("config").value = (await api(`/api/examples/${encodeURIComponent(name)}`)).yaml;
}

async function startRun() {
  $("start-error").hidden = true;
  try {
    const job = await api("/api/jobs", {yaml: $("config").value, example: $("example").value || null,
                                        force: $("force").checked});
    $("job").hidden = false;
    $("job-run").textContent = job.run;
    $("job-run").href = `#/run/${encodeURIComponent(job.run)}`;
    $("job-log").textContent = "";
    status($("job-state"), job.state);
    followLog(job.id, 0);
  } catch (e) {
    $("start-error").textContent = `error: ${e.message}`;
    $("start-error").hidden = false;
  }
}

async function followLog(id, offset) {
  const data = await api(`/api/jobs/${encodeURIComponent(id)}?offset=${offset}`);
  const log = $("job-log");
  const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
  log.textContent += data.text;
  if (atEnd) log.scrollTop = log.scrollHeight;
  status($("job-state"), data.state);
  if (data.state === "running" || data.more) {
    setTimeout(() => followLog(id, data.offset).catch((e) => showError(e.message)), data.more ? 50 : 1000);
  }
}

// -- compare ----------------------------------------------------------------------------------------------------

async function fillRunSelects(ids, filter) {
  const runs = (await runList()).filter(filter || (() => true));
  for (const id of ids) {
    const select = $(id), kept = select.value;
    select.replaceChildren(...runs.map((r) => new Option(`${r.name} (${r.objective || "?"}, ${r.status})`, r.name)));
    if (runs.some((r) => r.name === kept)) select.value = kept;
  }
  return runs;
}

async function showCompare() {
  const runs = await fillRunSelects(["compare-a", "compare-b"]);
  if (runs.length > 1 && $("compare-a").value === $("compare-b").value) $("compare-b").value = runs[1].name;
}

async function compare() {
  const a = $("compare-a").value, b = $("compare-b").value;
  const data = await api(`/api/compare?a=${encodeURIComponent(a)}&b=${encodeURIComponent(b)}`);
  const table = $("compare-table");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", ""), ...data.runs.flatMap((r) => [el("th", `${r.name}: base`), el("th", `${r.name}: tuned`)]));
  table.append(head);
  for (const field of ["status", "objective", "tuning", "model", "seconds"]) {
    const row = el("tr");
    row.append(el("th", field), ...data.runs.map((r) => {
      const cell = el("td", field === "seconds" ? clock(r[field]) : (r[field] ?? "-"));
      cell.colSpan = 2;
      return cell;
    }));
    table.append(row);
  }
  for (const m of data.metrics) {
    const row = el("tr");
    row.append(el("th", `${m.split} ${m.metric}`), ...m.values.map((v) => el("td", number(v), "num")));
    table.append(row);
  }
  table.hidden = false;
  $("compare-results").replaceChildren(...data.results.map((html, i) => {
    const box = el("div");
    box.append(el("h2", data.runs[i].name));
    box.insertAdjacentHTML("beforeend", html || "<p class=\"muted\">no held-out results yet</p>");
    return box;
  }));
}

// -- chat -------------------------------------------------------------------------------------------------------

async function showChat(name) {
  await fillRunSelects(["chat-run"], (r) => r.status === "completed" && r.generates);
  if (name) $("chat-run").value = name;
}

function addTurn(role, text, cut) {
  const turn = el("div", undefined, `turn ${role}`);
  turn.append(el("span", text, "text"));
  if (cut) turn.append(el("span", " [cut at max tokens]", "muted cut"));
  $("chat-log").append(turn);
  $("chat-log").scrollTop = $("chat-log").scrollHeight;
  return turn;
}

async function send(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text) return;
  $("chat-error").hidden = true;
  $("chat-input").value = "";
  conversation.push({role: "user", content: text});
  addTurn("user", text);
  $("chat-send").disabled = true;
  try {
    const reply = await api("/api/chat", {run: $("chat-run").value, messages: conversation});
    const choice = reply.choices[0];
    conversation.push({role: "assistant", content: choice.message.content});
    addTurn("assistant", choice.message.content, choice.finish_reason === "length");
  } catch (e) {
    conversation.pop();
    $("chat-error").textContent = `error: ${e.message}`;
    $("chat-error").hidden = false;
  } finally {
    $("chat-send").disabled = false;
  }
}

function resetChat() {
  conversation = [];
  $("chat-log").replaceChildren();
}

// -- routing ----------------------------------------------------------------------------------------------------

async function route() {
  clearTimeout(timer);
  showError("");
  const [view, arg] = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  const name = view || "runs";
  for (const section of document.querySelectorAll("main > section")) section.hidden = section.id !== `view-${name}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === name);
  const views = {runs: showRuns, run: () => showRun(arg), new: showNew, compare: showCompare,
                 chat: () => showChat(arg)};
  try {
    await (views[name] || showRuns)();
  } catch (e) {
    showError(e.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("example").addEventListener("change", () => pickExample().catch((e) => showError(e.message)));
  $("start").addEventListener("click", startRun);
  $("compare-go").addEventListener("click", () => compare().catch((e) => showError(e.message)));
  $("chat-form").addEventListener("submit", send);
  $("chat-run").addEventListener("change", resetChat);
  $("chat-reset").addEventListener("click", resetChat);
  window.addEventListener("hashchange", route);
  route();
});
