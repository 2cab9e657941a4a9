// pocketfleet fleet console: polls /api/state and renders it. Read-only; no dependencies.
// Every value from the fleet is inserted as text (textContent), never as HTML.
"use strict";

const TOKEN = (() => {
  const m = /(?:^|[#&])token=([^&]+)/.exec(location.hash);
  if (m) sessionStorage.setItem("pf-token", decodeURIComponent(m[1]));
  return sessionStorage.getItem("pf-token");
})();
const SVG = "http://www.w3.org/2000/svg";
const COLORS = ["#1a73e8", "#d93025", "#188038", "#f9ab00", "#9334e6", "#12b5cb", "#e8710a", "#5f6368"];
let refreshMs = 2000;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c == null ? "" : String(c)));
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function fmt(v, digits) {
  if (v === null || v === undefined) return "";
  if (typeof v === "number") return digits === undefined ? String(v) : v.toFixed(digits);
  return String(v);
}

function ago(ts, now) {
  if (!ts) return "";
  const s = Math.max(0, Math.round(now - ts));
  return s < 60 ? s + "s" : s < 3600 ? Math.floor(s / 60) + "m" : Math.floor(s / 3600) + "h";
}

function cell(v, cls) { return el("td", cls ? { class: cls } : {}, v); }

function renderDevices(state) {
  const body = document.querySelector("#devices tbody");
  const rows = state.devices.map((d) => {
    const tr = el("tr", { "data-device": d.device },
      cell(d.device), cell(d.group), cell(d.online ? "yes" : "no"), cell(d.model || ""),
      cell(fmt(d.version), "num"), cell(d.health, "h-" + d.health), cell(fmt(d.requests), "num"),
      cell(d.error_rate === null ? "" : (100 * d.error_rate).toFixed(1) + "%", "num"),
      cell(fmt(d.p50_ms, 2), "num"), cell(fmt(d.p95_ms, 2), "num"), cell(fmt(d.drift, 2), "num"),
      cell(d.link), cell(ago(d.last_seen, state.generated)));
    const names = ["device", "group", "online", "model", "version", "health", "requests", "error_rate", "p50_ms",
      "p95_ms", "drift", "link", "last_seen"];
    [...tr.children].forEach((td, i) => td.setAttribute("data-col", names[i]));
    return tr;
  });
  body.replaceChildren(...rows);
  const total = state.status.devices;
  document.getElementById("devices-note").textContent =
    state.devices.length < total ? `showing the ${state.devices.length} least healthy of ${total}` : "";
}

function renderRollouts(state) {
  const box = document.getElementById("rollouts");
  if (!state.rollouts.length) { box.replaceChildren(el("p", { class: "muted" }, "no rollouts yet")); return; }
  box.replaceChildren(...state.rollouts.map((r) => {
    const counts = Object.entries(r.counts || {}).map(([k, v]) => k + "=" + v).join(" ");
    const div = el("div", { class: "rollout", "data-rollout": r.rollout_id, "data-state": r.state },
      el("div", { class: "title" }, `${r.name} v${r.version} → ${r.group} `,
        el("span", { class: "state s-" + r.state, "data-field": "state" }, r.state),
        el("span", { class: "muted" }, ` ${r.rollout_id} · ${counts}`)));
    if (r.stages) {
      const stages = el("div", { class: "stages", "data-field": "stages", "data-stage": String(r.stage + 1) });
      r.stages.forEach((n, i) => {
        const cls = i < r.stage || r.state === "complete" ? "stage done" : i === r.stage ? "stage current" : "stage";
        stages.append(el("span", { class: cls }, `${i + 1}: ${n} dev`));
      });
      div.append(stages, el("div", { class: "muted" }, "abort if: " + (r.criteria || []).join(", ")));
    } else {
      div.append(el("div", { class: "muted" }, `canary ${Math.round(100 * r.canary)}% · gates: ` +
        ((r.gates || []).join(", ") || "install failures only")));
    }
    if (r.reason) div.append(el("div", { class: "reason", "data-field": "reason" }, r.reason));
    if (r.abort && r.abort.breaches) {
      for (const b of r.abort.breaches) {
        div.append(el("div", { class: "reason h-failing", "data-field": "breach" },
          `${b.metric} = ${fmt(b.observed, 4)} on ${b.devices} device(s) (abort if ${b.criterion})`));
      }
    }
    return div;
  }));
}

function renderModels(state) {
  const body = document.querySelector("#models tbody");
  body.replaceChildren(...state.models.map((m) => el("tr", { "data-model": `${m.model}:${m.version}` },
    cell(m.model), cell(fmt(m.version), "num"), cell(fmt(m.devices), "num"), cell(fmt(m.requests), "num"),
    cell(fmt(m.errors), "num"), cell(m.error_rate === null ? "" : (100 * m.error_rate).toFixed(1) + "%", "num"),
    cell(fmt(m.p50_ms, 2), "num"), cell(fmt(m.p95_ms, 2), "num"), cell(fmt(m.drift, 2), "num"))));
  const byModel = {};
  for (const s of state.series) (byModel[s.model] = byModel[s.model] || []).push(s);
  const charts = [];
  for (const [model, rows] of Object.entries(byModel)) {
    charts.push(chart(`${model}: p95 latency (ms)`, rows, "version", "bucket", "p95_ms"));
    charts.push(chart(`${model}: error rate`, rows, "version", "bucket", "error_rate"));
  }
  document.getElementById("charts").replaceChildren(...charts);
}

// A small line chart: one line per value of `key`, x = rows[x], y = rows[y].
function chart(title, rows, key, x, y, xLabel) {
  const W = 360, H = 150, L = 42, R = 8, T = 8, B = 22;
  const lines = {};
  for (const r of rows) if (r[y] !== null && r[y] !== undefined) (lines[r[key]] = lines[r[key]] || []).push(r);
  const all = Object.values(lines).flat();
  const box = el("div", { class: "chart", "data-chart": title }, el("div", { class: "label" }, title));
  const s = svg("svg", { width: W, height: H, viewBox: `0 0 ${W} ${H}` });
  box.append(s);
  if (!all.length) { box.append(el("div", { class: "muted" }, "no data")); return box; }
  const xs = all.map((r) => r[x]), ys = all.map((r) => r[y]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs), y1 = Math.max(...ys) * 1.1 || 1;
  const px = (v) => L + (x1 === x0 ? 0.5 : (v - x0) / (x1 - x0)) * (W - L - R);
  const py = (v) => H - B - (v / y1) * (H - T - B);
  s.append(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#c6cbd4" }));
  s.append(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#c6cbd4" }));
  for (const frac of [0, 0.5, 1]) {
    const t = svg("text", { x: L - 4, y: py(frac * y1) + 3, "text-anchor": "end", class: "axis" });
    t.textContent = (frac * y1).toPrecision(2);
    s.append(t);
  }
  const xl = svg("text", { x: W - R, y: H - 6, "text-anchor": "end", class: "axis" });
  xl.textContent = xLabel || "time";
  s.append(xl);
  Object.entries(lines).forEach(([k, pts], i) => {
    pts.sort((a, b) => a[x] - b[x]);
    const color = COLORS[i % COLORS.length];
    s.append(svg("polyline", { points: pts.map((p) => `${px(p[x])},${py(p[y])}`).join(" "), fill: "none",
      stroke: color, "stroke-width": 2, "data-series": k }));
    for (const p of pts) s.append(svg("circle", { cx: px(p[x]), cy: py(p[y]), r: 2.5, fill: color }));
    const lab = svg("text", { x: L + 6 + 48 * i, y: T + 10, fill: color });
    lab.textContent = key === "version" ? "v" + k : k;
    s.append(lab);
  });
  return box;
}

function renderFl(state) {
  const box = document.getElementById("fl");
  if (!state.fl_tasks.length) { box.replaceChildren(el("p", { class: "muted" }, "no federated tasks")); return; }
  box.replaceChildren(...state.fl_tasks.map((t) => {
    const table = el("table", { "data-task": t.task },
      el("thead", {}, el("tr", {}, ...["round", "state", "selected", "participants", "bytes", "duration s", "metrics"]
        .map((h) => el("th", {}, h)))),
      el("tbody", {}, ...t.rounds.map((r) => el("tr", {}, cell(r.round, "num"), cell(r.state),
        cell(r.selected, "num"), cell(r.participants, "num"), cell(r.bytes, "num"), cell(fmt(r.duration_s, 1), "num"),
        cell(Object.entries(r.metrics).map(([k, v]) => `${k}=${fmt(v, 4)}`).join(" "))))));
    const series = [];
    for (const r of t.rounds) for (const [k, v] of Object.entries(r.metrics)) series.push({ metric: k, round: r.round, v });
    return el("div", {}, el("h3", {}, `${t.task} (${t.state})`), table,
      chart(`${t.task}: metrics per round`, series, "metric", "round", "v", "round"));
  }));
}

function render(state) {
  const st = state.status;
  document.getElementById("summary").textContent =
    `${st.online}/${st.devices} devices online · ${st.active_rollouts.length} active rollout(s) · ` +
    `${st.fl_tasks.length} FL task(s)`;
  document.getElementById("updated").textContent =
    `updated ${new Date(state.generated * 1000).toLocaleTimeString()} by ${state.worker}`;
  document.body.setAttribute("data-generated", String(state.generated));
  renderDevices(state);
  renderRollouts(state);
  renderModels(state);
  renderFl(state);
}

async function poll() {
  try {
    const resp = await fetch("api/state", { headers: TOKEN ? { Authorization: "Bearer " + TOKEN } : {} });
    if (resp.status === 401) {
      document.getElementById("summary").textContent = "token required: open the console as …/#token=YOUR_TOKEN";
    } else if (resp.ok) {
      const state = await resp.json();
      refreshMs = 1000 * (state.refresh_s || 2);
      render(state);
    }
  } catch (err) {
    document.getElementById("summary").textContent = "cloud unreachable: " + err;
  }
  setTimeout(poll, refreshMs);
}

poll();
