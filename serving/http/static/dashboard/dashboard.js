// lorafleet operator dashboard: polls GET admin/dashboard with the admin key typed in the
// header, draws the fleet, traffic, drift, jobs and history, and acts through the admin
// routes. Plain DOM and SVG, no dependencies; every request is relative to the page, so the
// dashboard works behind a path prefix too.
"use strict";

const POLL_MS = 2000;
const KEY_STORE = "lorafleet-admin-key"; // sessionStorage: gone with the tab
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
  "#e377c2", "#7f7f7f", "#bcbd22"];
const TRAFFIC_CHARTS = [
  ["requests_per_s", "Requests / s", (v) => fixed(v, 2)],
  ["p50_s", "Latency p50 (s)", (v) => fixed(v, 3)],
  ["p95_s", "Latency p95 (s)", (v) => fixed(v, 3)],
  ["p99_s", "Latency p99 (s)", (v) => fixed(v, 3)],
  ["completion_tokens_per_s", "Generated tokens / s", (v) => fixed(v, 1)],
  ["error_rate", "Error rate", (v) => percent(v)],
];

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  data: null,
  timer: null,
  lastGood: null,
  colors: new Map(),
  driftBlocks: new Map(),
  polls: 0,
};

class DashboardError extends Error {
  constructor(title, message, status) {
    super(message);
    this.title = title;
    this.status = status || 0;
  }
}

// ---- helpers -----------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function svg(tag, attrs, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function fixed(value, digits) {
  return value === null || value === undefined ? "–" : Number(value).toFixed(digits);
}

function percent(value) {
  return value === null || value === undefined ? "–" : `${(value * 100).toFixed(1)}%`;
}

function clock(when) {
  if (when === null || when === undefined) return "–";
  const date = typeof when === "number" ? new Date(when * 1000) : new Date(when);
  return isNaN(date) ? String(when) : date.toLocaleString();
}

function colorOf(model) {
  if (!state.colors.has(model)) {
    state.colors.set(model, COLORS[state.colors.size % COLORS.length]);
  }
  return state.colors.get(model);
}

function replace(container, ...children) {
  container.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined));
}

// ---- talking to the server ---------------------------------------------------------------

async function api(path, options) {
  if (!state.key) throw new DashboardError("No admin key", "enter the server's admin key above");
  const init = { method: "GET", cache: "no-store", ...(options || {}) };
  init.headers = { Authorization: `Bearer ${state.key}` };
  if (init.body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(init.body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new DashboardError(
      "Server unreachable",
      `no answer from ${new URL(path, location.href).origin}: ${err.message}. ` +
        "Is `lorafleet serve` running? The page keeps trying every few seconds.",
    );
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error && body.error.message ? body.error.message : text;
    if (response.status === 401) {
      throw new DashboardError(
        "Wrong admin key",
        `the server refused the key (401): ${message}. Enter the key the server was started ` +
          "with (--api-key or LORAFLEET_API_KEY).",
        401,
      );
    }
    throw new DashboardError(`Refused (${response.status})`, message || response.statusText,
      response.status);
  }
  return body;
}

function showError(err) {
  const box = $("error");
  replace(box, el("strong", { text: err.title || "Error" }), err.message);
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  replace($("error"));
}

function setStatus(text, live) {
  const status = $("status");
  status.textContent = text;
  status.className = live === undefined ? "" : live ? "live" : "stale";
}

// One polling loop: each call supersedes the one before (a key entered, an action done, the
// filter changed); an answer that arrives after a newer call started is dropped.
async function poll() {
  clearTimeout(state.timer);
  state.timer = null;
  const mine = ++state.polls;
  if (!state.key) {
    setStatus("Enter the server's admin key (--api-key).");
    return;
  }
  try {
    const filter = $("filter").value.trim();
    const data = await api(`admin/dashboard?adapter=${encodeURIComponent(filter)}`);
    if (mine !== state.polls) return;
    state.data = data;
    state.lastGood = new Date();
    clearError();
    render(data);
    setStatus(`Live · updated ${state.lastGood.toLocaleTimeString()}`, true);
  } catch (err) {
    if (mine !== state.polls) return;
    showError(err);
    const last = state.lastGood ? state.lastGood.toLocaleTimeString() : "never";
    setStatus(`${err.title} · last update ${last}`, false);
    if (err.status === 401) return; // the same key stays wrong: wait for a new one
  }
  state.timer = setTimeout(poll, POLL_MS);
}

// ---- rendering ---------------------------------------------------------------------------

// The adapters the filter box lets through (all when it is empty).
function shown(name) {
  const filter = $("filter").value.trim().toLowerCase();
  return !filter || name.toLowerCase().includes(filter);
}

function render(data) {
  const s = data.server;
  $("server-info").textContent =
    `${s.engine} engine · base ${s.base} · registry revision ${data.fleet.revision} ` +
    `(serving ${s.serving_revision}) · ${data.residency.resident.length}/${s.capacity} ` +
    "adapter slots in use";
  renderFleet(data);
  renderCanaries(data.canaries);
  renderActionChoices(data.fleet.adapters);
  renderTraffic(data.traffic);
  renderDrift(data.drift, data.server.now);
  renderJobs(data.fleet.jobs);
  renderHistory(data.fleet.events);
}

function residencyOf(residency, key) {
  if (residency.resident.includes(key)) {
    return residency.pinned.includes(key)
      ? el("span", { className: "badge pinned", text: "pinned" })
      : el("span", { className: "badge", text: "loaded" });
  }
  if (key in residency.evicted) {
    return el("span", {
      className: "badge evicted",
      text: `evicted ${new Date(residency.evicted[key] * 1000).toLocaleTimeString()}`,
    });
  }
  return el("span", { className: "badge evicted", text: "not loaded" });
}

function aliasBadges(adapter, version) {
  return Object.entries(adapter.aliases)
    .filter(([, held]) => held.version === version)
    .map(([alias, held]) => {
      const weight = held.weight === null ? "" : ` ${Math.round(held.weight * 1000) / 10}%`;
      return el("span", { className: `badge ${alias}`, text: `${alias}${weight}` });
    });
}

function moveText(move) {
  if (!move) return "no promote or rollback yet";
  const what = move.action === "alias.rollback" ? "rolled back" : "set";
  return `last move: ${move.alias} ${what} to v${move.version} by ${move.actor} at ` +
    `${clock(move.at)}${move.reason ? ` (${move.reason})` : ""}`;
}

function renderFleet(data) {
  const adapters = data.fleet.adapters.filter((a) => shown(a.name));
  if (!adapters.length) {
    const text = data.fleet.adapters.length
      ? "No adapter name contains the filter."
      : "No adapter is registered.";
    replace($("fleet"), el("p", { className: "empty", text }));
    return;
  }
  const recent = data.traffic.recent;
  const head = el("thead", {}, el("tr", {},
    ["Version", "State", "Aliases", "Residency", "Created", "Origin", "Req/s (1 min)",
      "p95 s (1 min)", "Errors (1 min)"].map((t) => el("th", { scope: "col", text: t }))));
  const bodies = adapters.map((adapter) => {
    const title = el("tr", {}, el("th", { scope: "rowgroup", colspan: 9 },
      adapter.name,
      adapter.pinned ? el("span", { className: "badge pinned", text: "pinned" }) : null,
      el("span", { className: "meta", text: moveText(adapter.last_move) })));
    const rows = adapter.versions.slice().reverse().map((v) => {
      const key = `${adapter.name}@${v.version}`;
      const minute = recent[key];
      const origin = v.job_id
        ? `job ${v.job_id} (${v.trigger}) from v${v.parent_version}`
        : v.actor;
      return el("tr", {
        className: v.state === "archived" ? "archived" : "",
        "data-adapter": adapter.name,
        "data-version": v.version,
      },
      el("td", { text: `v${v.version}` }),
      el("td", { text: v.state }),
      el("td", { className: "aliases" }, aliasBadges(adapter, v.version)),
      el("td", { className: "residency" }, residencyOf(data.residency, key)),
      el("td", { text: clock(v.created_at) }),
      el("td", { text: origin }),
      el("td", { className: "num rate", text: minute ? fixed(minute.requests_per_s, 2) : "0.00" }),
      el("td", { className: "num", text: minute ? fixed(minute.p95_s, 3) : "–" }),
      el("td", {
        className: `num${minute && minute.error_rate ? " bad" : ""}`,
        text: minute ? percent(minute.error_rate) : "–",
      }));
    });
    return el("tbody", { "data-adapter": adapter.name }, title, rows);
  });
  replace($("fleet"), el("table", { id: "fleet-table" }, el("caption", {
    className: "note",
    text: `${adapters.length} of ${data.fleet.adapters.length} adapters`,
  }), head, bodies));
}

function renderCanaries(canaries) {
  if (!canaries.length) {
    replace($("canaries"));
    return;
  }
  const items = canaries.map((c) => {
    const verdict = c.waiting
      ? `waiting: ${c.waiting}`
      : `ready: ${{ promoted: "would promote", rolled_back: "would roll back" }[c.verdict] ||
        "inconclusive, collecting"} (${c.reason})`;
    return el("li", {}, `${c.adapter}: canary v${c.canary_version} vs production ` +
      `v${c.production_version ?? "–"}, ${c.canary.requests} vs ${c.production.requests} ` +
      `requests since ${clock(c.since)}; ${verdict}`);
  });
  replace($("canaries"), el("h3", { text: "Canaries" }), el("ul", {}, items));
}

function setOptions(select, values, labels) {
  const current = select.value;
  const same = select.options.length === values.length &&
    values.every((v, i) => select.options[i].value === String(v));
  if (!same) {
    replace(select, values.map((v, i) => el("option", { value: v, text: labels[i] })));
  }
  if (values.map(String).includes(current)) select.value = current;
}

function renderActionChoices(adapters) {
  const names = adapters.map((a) => a.name);
  setOptions($("act-adapter"), names, names);
  const chosen = adapters.find((a) => a.name === $("act-adapter").value);
  const versions = chosen ? chosen.versions.filter((v) => v.state === "active").reverse() : [];
  setOptions($("act-version"), versions.map((v) => v.version), versions.map((v) => {
    const held = Object.keys(chosen.aliases).filter((a) => chosen.aliases[a].version === v.version);
    return `v${v.version}${held.length ? ` (${held.join(", ")})` : ""}`;
  }));
  const aliases = $("alias-names");
  const known = new Set(["production", "staging", "canary"]);
  if (chosen) Object.keys(chosen.aliases).forEach((a) => known.add(a));
  setOptions(aliases, [...known], [...known]);
}

function renderTraffic(traffic) {
  const versions = traffic.versions;
  $("traffic-note").textContent = traffic.matching > versions.length
    ? ` Drawn: the ${versions.length} busiest of ${traffic.matching} versions; the filter ` +
      "above narrows them."
    : "";
  replace($("legend"), versions.map((v) => {
    const item = el("li", { text: v.model });
    item.style.setProperty("--swatch", colorOf(v.model)); // CSSOM: allowed by the CSP
    return item;
  }));
  if (!versions.length) {
    replace($("traffic"), el("p", { className: "empty", text: "No requests in the window." }));
    return;
  }
  replace($("traffic"), TRAFFIC_CHARTS.map(([field, title, format]) => chart({
    id: `chart-${field}`,
    title,
    times: traffic.times,
    lines: versions.map((v) => ({ model: v.model, values: v[field] })),
    format,
    width: 360,
    height: 150,
  })));
}

function renderDrift(drift, nowS) {
  const container = $("drift");
  if (!drift.enabled) {
    replace(container, el("p", { className: "empty", text: "Drift detection is off (--no-drift)." }));
    return;
  }
  const now = new Map(drift.now.map((v) => [`${v.adapter}@${v.version}`, v]));
  const history = drift.history;
  $("drift-note").textContent = drift.matching > history.length
    ? ` Drawn: ${history.length} of ${drift.matching} versions, drifted ones first.`
    : "";
  if (!history.length) {
    replace(container, el("p", { className: "empty", text: "No version has drift samples yet." }));
    state.driftBlocks.clear();
    return;
  }
  // One block per version, kept across polls, so its button keeps the keyboard focus.
  const wanted = new Set(history.map((h) => h.model));
  for (const [model, block] of state.driftBlocks) {
    if (!wanted.has(model)) {
      block.root.remove();
      state.driftBlocks.delete(model);
    }
  }
  if (!state.driftBlocks.size) replace(container);
  for (const h of history) {
    let block = state.driftBlocks.get(h.model);
    if (!block) {
      block = driftBlock(h.model);
      state.driftBlocks.set(h.model, block);
      container.append(block.root);
    }
    const current = now.get(h.model);
    const drifted = current ? current.drifted : [];
    block.summary.textContent = current
      ? `${current.samples} requests and ${current.feedback_samples} ratings in the window` +
        (drifted.length ? `; drifted: ${drifted.join(", ")}` : "; no signal above its threshold")
      : "not tracked any more";
    block.summary.className = drifted.length ? "bad" : "note";
    replace(block.charts, Object.keys(drift.thresholds).map((signal) => chart({
      id: `drift-${h.model}-${signal}`,
      title: drift.titles[signal] || signal,
      times: h.times,
      lines: [{ model: h.model, values: h.scores[signal] || h.times.map(() => null) }],
      threshold: drift.thresholds[signal],
      start: nowS - drift.window_s,
      end: nowS,
      format: (v) => fixed(v, 3),
      width: 260,
      height: 120,
    })));
  }
}

function driftBlock(model) {
  const summary = el("span", { className: "note" });
  const button = el("button", { type: "button", className: "secondary", text: "Baseline vs live" });
  button.addEventListener("click", () => showDriftDetail(model, button));
  const charts = el("div", { className: "charts" });
  const root = el("div", { className: "drift-version", "data-model": model },
    el("div", { className: "drift-head" }, el("h3", { text: model }), summary, button), charts);
  return { root, summary, charts };
}

async function showDriftDetail(model, button) {
  const detail = $("drift-detail");
  button.disabled = true;
  replace(detail, el("p", { className: "note", text: `Loading the drift report of ${model}…` }));
  try {
    const report = await api(`admin/dashboard/drift?model=${encodeURIComponent(model)}`);
    const images = Object.entries(report.plots).map(([signal, uri]) => el("img", {
      src: uri,
      alt: `${state.data.drift.titles[signal] || signal} of ${model}: baseline vs live, score ` +
        `${fixed(report.signals[signal].score, 3)}, threshold ${report.signals[signal].threshold}`,
    }));
    replace(detail, el("h3", {
      text: `${model}: baseline vs live (${report.samples} requests, at ` +
        `${new Date().toLocaleTimeString()})`,
    }), report.baseline ? null : el("p", {
      className: "bad",
      text: "This version has no training profile: its signals cannot be scored.",
    }), images);
  } catch (err) {
    replace(detail, el("p", { className: "bad", text: `${err.title}: ${err.message}` }));
  } finally {
    button.disabled = false;
  }
}

function renderJobs(jobs) {
  if (!jobs.length) {
    replace($("jobs"), el("p", { className: "empty", text: "No retraining job yet." }));
    return;
  }
  const head = el("thead", {}, el("tr", {}, ["Job", "Adapter", "State", "Trigger", "Queued",
    "Finished", "Registered", "Gate", "Canary verdict", "Error"].map((t) =>
    el("th", { scope: "col", text: t }))));
  const rows = jobs.map((job) => {
    const gate = job.result && job.result.gate;
    const verdict = job.canary_verdict;
    return el("tr", { "data-job": job.id },
      el("td", { text: job.id }),
      el("td", { text: job.adapter }),
      el("td", { className: job.state === "failed" ? "bad" : "", text: job.state }),
      el("td", { text: job.trigger.startsWith("alert:") ? `alert ${job.trigger.slice(6)}` : job.trigger }),
      el("td", { text: clock(job.created_at) }),
      el("td", { text: clock(job.finished_at) }),
      el("td", { text: job.version ? `v${job.version}` : "–" }),
      el("td", {
        className: gate ? (gate.passed ? "good" : "bad") : "",
        text: gate ? (gate.passed ? "passed" : `failed: ${(gate.failures || []).join("; ")}`) : "–",
      }),
      el("td", { text: verdict ? `${verdict.reason} (${verdict.actor})` : job.version ? "pending" : "–" }),
      el("td", { className: "bad", text: job.error && !(gate && !gate.passed) ? job.error : "" }));
  });
  replace($("jobs"), el("table", { id: "jobs-table" }, head, el("tbody", {}, rows)));
}

function renderHistory(events) {
  if (!events.length) {
    replace($("history"), el("p", { className: "empty", text: "No events." }));
    return;
  }
  const head = el("thead", {}, el("tr", {}, ["When", "Actor", "Action", "Target", "Reason"].map(
    (t) => el("th", { scope: "col", text: t }))));
  const rows = events.map((e) => {
    let target = e.adapter || "";
    if (e.alias) target += `:${e.alias}`;
    if (e.version !== null) target += ` → v${e.version}`;
    if (e.weight !== null && e.weight !== undefined) target += ` (${percent(e.weight)})`;
    if (e.job !== null && e.job !== undefined) target += ` [job ${e.job}]`;
    return el("tr", { "data-event": e.id },
      el("td", { text: clock(e.at) }),
      el("td", { text: e.actor }),
      el("td", { text: e.action }),
      el("td", { text: target }),
      el("td", { text: e.reason }));
  });
  replace($("history"), el("table", { id: "history-table" }, head, el("tbody", {}, rows)));
}

// A line chart: one path per model (gaps where a value is null), an optional dashed
// threshold, the largest value and the time span on the axes. Each path carries its model,
// largest and last value as data attributes, and the figure a text summary for screen readers.
function chart({ id, title, times, lines, threshold, format, width, height, start, end }) {
  const pad = { left: 46, right: 8, top: 8, bottom: 18 };
  const w = width - pad.left - pad.right;
  const h = height - pad.top - pad.bottom;
  const values = lines.flatMap((l) => l.values.filter((v) => v !== null && v !== undefined));
  let top = Math.max(0, ...values, threshold || 0);
  if (top === 0) top = 1;
  top *= 1.1;
  const t0 = start ?? times[0];
  const span = Math.max((end ?? times[times.length - 1]) - t0, 1);
  const x = (t) => pad.left + ((t - t0) / span) * w;
  const y = (v) => pad.top + h - (v / top) * h;
  const root = svg("svg", {
    class: "chart",
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-labelledby": `${id}-title`,
  });
  root.append(
    svg("line", { class: "axis", x1: pad.left, y1: pad.top + h, x2: pad.left + w, y2: pad.top + h }),
    svg("line", { class: "axis", x1: pad.left, y1: pad.top, x2: pad.left, y2: pad.top + h }),
    svg("text", { x: pad.left - 4, y: pad.top + 8, "text-anchor": "end" }, format(top / 1.1)),
    svg("text", { x: pad.left - 4, y: pad.top + h, "text-anchor": "end" }, format(0)),
    svg("text", { x: pad.left, y: height - 4 }, `−${Math.round(span / 60)} min`),
    svg("text", { x: pad.left + w, y: height - 4, "text-anchor": "end" }, "now"),
  );
  if (threshold !== undefined && threshold !== null) {
    root.append(svg("line", {
      class: "threshold", x1: pad.left, x2: pad.left + w, y1: y(threshold), y2: y(threshold),
    }));
  }
  const summary = [];
  for (const line of lines) {
    let d = "";
    let open = false;
    let max = null;
    let last = null;
    const dots = [];
    line.values.forEach((v, i) => {
      if (v === null || v === undefined) {
        open = false;
        return;
      }
      d += `${open ? "L" : "M"}${x(times[i]).toFixed(1)} ${y(v).toFixed(1)} `;
      const next = line.values[i + 1];
      if (!open && (next === null || next === undefined)) {
        dots.push([x(times[i]), y(v)]); // a lone point: drawn as a dot
      }
      open = true;
      max = max === null ? v : Math.max(max, v);
      last = v;
    });
    root.append(svg("path", {
      class: "series",
      d: d || "M0 0",
      stroke: colorOf(line.model),
      "data-model": line.model,
      "data-max": max === null ? "" : max,
      "data-last": last === null ? "" : last,
    }));
    for (const [cx, cy] of dots) {
      root.append(svg("circle", { cx, cy, r: 2.2, fill: colorOf(line.model) }));
    }
    summary.push(`${line.model}: latest ${format(last)}, peak ${format(max)}`);
  }
  const caption = el("figcaption", { id: `${id}-title` },
    title + (threshold !== undefined && threshold !== null ? ` · threshold ${threshold}` : ""));
  return el("figure", { id, "data-title": title, title: summary.join("; ") }, caption, root);
}

// ---- forms -------------------------------------------------------------------------------

function showKindFields() {
  const kind = $("act-kind").value;
  document.querySelectorAll("#action-form [data-kinds]").forEach((field) => {
    field.hidden = !field.dataset.kinds.split(" ").includes(kind);
  });
}

function actionRequest(kind, adapter) {
  const alias = $("act-alias").value.trim() || "production";
  const reason = $("act-reason").value.trim();
  const weightText = $("act-weight").value.trim();
  const weight = weightText === "" ? null : Number(weightText);
  if (kind === "promote") {
    const version = Number($("act-version").value);
    const body = { adapter, alias, version, reason };
    if (alias === "canary" && weight !== null) body.weight = weight;
    return ["admin/promote", body, `${adapter}:${alias} → v${version}`];
  }
  if (kind === "rollback") return ["admin/rollback", { adapter, alias, reason }, `${adapter}:${alias} rolled back`];
  if (kind === "weight") {
    const canary = state.data && state.data.fleet.adapters.find((a) => a.name === adapter);
    const held = canary && canary.aliases.canary;
    if (!held) {
      throw new DashboardError("No canary", `${adapter} has no canary alias; promote a version ` +
        "to the canary alias first");
    }
    return ["admin/promote", { adapter, alias: "canary", version: held.version, weight, reason },
      `${adapter}:canary weight ${weight}`];
  }
  return [`admin/${kind}`, { adapter, reason }, `${adapter} ${kind}ned`];
}

async function submitAction(event) {
  event.preventDefault();
  const result = $("action-result");
  const kind = $("act-kind").value;
  const adapter = $("act-adapter").value;
  const reasonInput = $("act-reason");
  result.className = "failed";
  if (!adapter) {
    result.textContent = "No adapter to act on: register one first (lorafleet registry register).";
    return;
  }
  if (!reasonInput.value.trim()) {
    result.textContent = "Give a reason: it is recorded with the change in the registry history.";
    reasonInput.focus();
    return;
  }
  const weight = $("act-weight").value.trim();
  if (kind === "weight" && (weight === "" || !(Number(weight) >= 0 && Number(weight) <= 1))) {
    result.textContent = `Canary weight ${JSON.stringify(weight)} is not a number in [0, 1]; ` +
      "e.g. 0.1 sends a tenth of the traffic to the canary.";
    $("act-weight").focus();
    return;
  }
  const button = $("act-submit");
  button.disabled = true;
  result.className = "";
  result.textContent = "Applying…";
  try {
    const [path, body, what] = actionRequest(kind, adapter);
    const answer = await api(path, { method: "POST", body });
    result.className = "ok";
    const moved = answer && answer.changed === false ? " (it already was; nothing changed)" : "";
    result.textContent = `Done: ${what}${moved}.`;
    reasonInput.value = "";
    poll();
  } catch (err) {
    result.className = "failed";
    result.textContent = `${err.title}: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

function useKey(event) {
  event.preventDefault();
  const input = $("admin-key");
  const key = input.value.trim();
  if (!/^[\x21-\x7e]+$/.test(key)) {
    showError(new DashboardError("Unusable admin key",
      "the key must be printable ASCII without spaces (it travels in an HTTP header)"));
    return;
  }
  state.key = key;
  sessionStorage.setItem(KEY_STORE, key);
  input.value = "";
  input.placeholder = "key set (enter another to change)";
  setStatus("Connecting…");
  poll();
}

document.addEventListener("DOMContentLoaded", () => {
  $("key-form").addEventListener("submit", useKey);
  $("action-form").addEventListener("submit", submitAction);
  $("act-kind").addEventListener("change", showKindFields);
  for (const type of ["input", "change"]) {
    $("filter").addEventListener(type, () => {
      if (state.data) render(state.data); // the fleet table at once, the charts on the answer
      poll();
    });
  }
  $("act-adapter").addEventListener("change", () => {
    if (state.data) renderActionChoices(state.data.fleet.adapters);
  });
  showKindFields();
  if (state.key) $("admin-key").placeholder = "key set (enter another to change)";
  poll();
});
