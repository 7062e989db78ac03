"use strict";
// kibble dashboard: one websocket of pushes from the server (services/views/dashboard.py),
// requests posted to /api/param, /api/revert and /api/cmd.

const CHARTS = [
  {title: "coil z (link z)", src: "daq", cols: ["coil_z_m", "coil_z_0p1hz_m"], names: ["z", "z 0.1 Hz"]},
  {title: "servo error", src: "servo", cols: ["error_m"], names: ["error"]},
  {title: "servo force", src: "servo", cols: ["force_n"], names: ["force"]},
  {title: "currents", src: "daq", cols: ["main_coil_current_a", "counter_mass_current_a"],
   names: ["main coil", "counter mass"]},
  {title: "coil voltage (EFB: HV)", src: "daq", cols: ["coil_voltage_v"], names: ["U"]},
  {title: "x, y", src: "daq", cols: ["coil_x_m", "coil_y_m"], names: ["x", "y"]},
  {title: "tilts and twist", src: "daq", cols: ["coil_theta_x_rad", "coil_theta_y_rad", "coil_theta_z_rad"],
   names: ["θx", "θy", "θz"]},
  {title: "temperature", src: "daq", cols: ["temperature_k"], names: ["T"]},
  {title: "pressure", src: "daq", cols: ["pressure_pa"], names: ["p"]},
];
const COLORS = ["#4aa3ff", "#f0b429", "#3fb27f", "#e5534b", "#b78cff"];
const PREFIXES = [[1e-15, "f"], [1e-12, "p"], [1e-9, "n"], [1e-6, "µ"], [1e-3, "m"], [1, ""], [1e3, "k"], [1e6, "M"]];

function si(v, unit) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  if (unit === "K") return `${v.toFixed(4)} K`;  // a thermometer's mK, not a prefix
  if (unit === "" || unit === undefined) return `${+v.toPrecision(6)}`;
  const a = Math.abs(v);
  let p = PREFIXES[5];
  for (const q of PREFIXES) if (a >= q[0] * 0.9995) p = q;
  if (a === 0) p = PREFIXES[5];
  return `${+(v / p[0]).toPrecision(5)} ${p[1]}${unit}`;
}
function esc(s) { return String(s).replace(/[&<>"]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c])); }
function ago(s) { return s === null || s === undefined ? "–" : s < 100 ? `${s.toFixed(1)} s` : `${(s / 60).toFixed(0)} min`; }
function hhmmss(t) { return new Date(t * 1000).toISOString().substr(11, 8); }

const state = {window_s: 10, units: {}, unmeasured: [], data: {}, charts: [], params: {}, tab: null, commands: [], statuses: [],
               now: 0, eventsShown: 0};

function buildCharts() {
  const host = document.getElementById("traces");
  host.innerHTML = "";
  // a chart of what this instrument does not measure (the EFB's currents, x, y, tilts) is left out
  const shown = CHARTS.filter(c => c.cols.some(col => !state.unmeasured.includes(col)));
  state.charts = shown.map((c, i) => {
    const div = document.createElement("div");
    div.className = "chart";
    div.innerHTML = `<h3>${esc(c.title)}<span class="now" id="now-${i}"></span></h3>`;
    host.appendChild(div);
    const unit = state.units[c.cols[0]] || "";
    const opts = {
      width: Math.max(300, div.clientWidth - 12), height: 150,
      scales: {x: {time: true}},
      axes: [{stroke: "#7d8b99", grid: {stroke: "#1f2935"}, ticks: {stroke: "#263241"}},
             {stroke: "#7d8b99", grid: {stroke: "#1f2935"}, ticks: {stroke: "#263241"}, size: 84,
              values: (u, vals) => vals.map(v => si(v, unit))}],
      series: [{}, ...c.names.map((n, j) => ({label: n, stroke: COLORS[j], width: j === 1 && c.cols[1].endsWith("0p1hz_m") ? 2 : 1.2,
                                               value: (u, v) => si(v, unit)}))],
      legend: {live: true},
    };
    const plot = new uPlot(opts, [[], ...c.cols.map(() => [])], div);
    return {def: c, plot, div, unit};
  });
}

function mergeTraces(msg) {
  for (const [src, tr] of Object.entries(msg.traces)) {
    if (msg.full || !state.data[src]) state.data[src] = {t: []};
    const d = state.data[src];
    const before = d.t.length;
    d.t.push(...tr.t);
    for (const [col, vals] of Object.entries(tr)) {
      if (col === "t") continue;
      if (!d[col]) d[col] = new Array(before).fill(null);
      d[col].push(...vals);
    }
    const cut = msg.now_utc_s - msg.window_s;
    let i = 0;
    while (i < d.t.length && d.t[i] < cut) i++;
    if (i) for (const key of Object.keys(d)) d[key].splice(0, i);
  }
}

function drawCharts(msg) {
  for (const [i, ch] of state.charts.entries()) {
    const d = state.data[ch.def.src] || {t: []};
    const cols = ch.def.cols.map(c => d[c] || []);
    ch.plot.setData([d.t, ...cols], false);
    ch.plot.setScale("x", {min: msg.now_utc_s - msg.window_s, max: msg.now_utc_s});
    const last = cols.map(c => c.length ? c[c.length - 1] : null);
    document.getElementById(`now-${i}`).textContent = last.map(v => si(v, ch.unit)).join("  ·  ");
  }
}

function panel(s) {
  const det = s.detail || {};
  const c = s.counters || {};
  const cls = s.online ? (s.stale ? "stale" : s.state) : "offline";
  const label = !s.online ? "offline" : s.stale ? `${s.state} (stale)` : s.state;
  const extra = [];
  if (det.mode) extra.push(`mode <b>${esc(det.mode)}</b>`);
  if (det.trajectory) extra.push(`trajectory ${esc(det.trajectory)}`);
  if (det.guard && det.guard !== s.state) extra.push(`guard ${esc(det.guard)}`);
  if (det.stale === true) extra.push("input stale");
  if (det.exit) extra.push(`exit: ${esc(det.exit)}`);
  const counters = Object.entries(c).filter(([, v]) => v).map(([k, v]) => `${k} ${v}`).join(" · ");
  return `<div class="panel ${esc(cls)}" data-service="${esc(s.service)}">
    <div class="head"><span class="name">${esc(s.service)}</span><span class="state ${esc(s.state)}">${esc(label)}</span></div>
    ${det.trip_reason ? `<div class="trip">trip: ${esc(det.trip_reason)}</div>` : ""}
    ${extra.length ? `<div>${extra.join(" · ")}</div>` : ""}
    <dl><dt>session</dt><dd>${s.session}</dd><dt>heartbeat</dt><dd>${ago(s.heartbeat_age_s)}</dd>
        <dt>frame age</dt><dd>${s.frame_age_ms_p50.toFixed(2)} / ${s.frame_age_ms_p99.toFixed(2)} ms</dd>
        <dt>CPU/frame</dt><dd>${s.cpu_us_p50.toFixed(0)} / ${s.cpu_us_p99.toFixed(0)} µs</dd>
        <dt>load</dt><dd>${(100 * s.cpu_load).toFixed(0)} %</dd><dt>online</dt><dd>${s.online}</dd></dl>
    ${counters ? `<div class="counters">${esc(counters)}</div>` : ""}</div>`;
}

function drawPanels(msg) {
  state.statuses = msg.statuses;
  document.getElementById("panels").innerHTML = msg.statuses.map(panel).join("");
  const seq = msg.statuses.find(s => s.service === "sequencer");
  const el = document.getElementById("sequencer");
  if (seq && seq.detail && seq.detail.plan) {
    const d = seq.detail, frac = d.total_s > 0 ? Math.min(1, d.sim_s / d.total_s) : 0;
    el.innerHTML = `plan <b>${esc(d.plan)}</b> (${esc(d.engine)}) step ${esc(d.step)}<span class="progress"><i style="width:${(100 * frac).toFixed(0)}%"></i></span>` +
      `${d.sim_s.toFixed(0)} / ${d.total_s.toFixed(0)} s, ETA ${d.eta_s >= 0 ? ago(d.eta_s) : "–"}`;
  } else el.textContent = seq ? "sequencer idle" : "";
}

function drawEvents(msg) {
  const ol = document.getElementById("events");
  const items = msg.events.map(e => `<li class="${esc(e.severity)}"><span class="t">${hhmmss(e.t_utc_s)}</span><span class="svc">${esc(e.service)}</span><b>${esc(e.kind)}</b> ${esc(e.text)}</li>`).reverse().join("");
  if (msg.full) ol.innerHTML = items; else if (items) ol.insertAdjacentHTML("afterbegin", items);
  while (ol.children.length > 300) ol.removeChild(ol.lastChild);
}

function drawParams() {
  const tabs = document.getElementById("param-tabs");
  const names = Object.keys(state.params);
  if (!state.tab || !names.includes(state.tab)) state.tab = names.includes("servo") ? "servo" : names[0];
  tabs.innerHTML = names.map(n => `<button class="small ${n === state.tab ? "active" : ""}" data-tab="${esc(n)}">${esc(n)}</button>`).join("");
  const body = document.querySelector("#param-table tbody");
  const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.param : null;
  if (focused) return;  // do not overwrite what the operator is typing
  body.innerHTML = (state.params[state.tab] || []).map(p => {
    const range = p.choices && p.choices.length ? p.choices.join(" | ") :
      (p.min !== null || p.max !== null) ? `[${p.min ?? "−∞"}, ${p.max ?? "∞"}]` : "";
    return `<tr><td>${esc(p.name)}</td><td><input data-param="${esc(p.name)}" value="${esc(p.value)}" ${p.read_only ? "readonly" : ""}></td>
      <td>${esc(p.unit)}</td><td class="range">${esc(range)}</td><td>${p.read_only ? "" : `<button class="small" data-set="${esc(p.name)}">set</button>`}</td>
      <td class="doc">${esc(p.doc)}</td></tr>`;
  }).join("");
}

function drawCommands() {
  const present = new Set(state.statuses.filter(s => s.online).map(s => s.service));
  const groups = {};
  state.commands.forEach((c, i) => { if (present.has(c.service)) (groups[c.service] = groups[c.service] || []).push([c, i]); });
  const key = Object.keys(groups).join(",");
  if (key === state.commandsKey) return;  // redrawn only when the daemons change: a click must find its button
  state.commandsKey = key;
  document.getElementById("commands").innerHTML = Object.entries(groups).map(([svc, cs]) =>
    `<div class="cmd-group"><b>${esc(svc)}</b>${cs.map(([c, i]) => `<button class="small" data-cmd="${i}">${esc(c.label)}</button>`).join("")}</div>`).join("");
}

async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
  if (!r.ok) return {ok: false, error: await r.text()};
  return r.json();
}
function showReply(id, reply, okText) {
  const el = document.getElementById(id);
  el.className = "reply " + (reply.ok ? "ok" : "bad");
  el.textContent = reply.ok ? okText(reply.result) : `refused: ${reply.error}`;
}

function confirmThen(text, action) {
  const dlg = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  dlg.returnValue = "";
  dlg.onclose = () => { if (dlg.returnValue === "ok") action(); };
  dlg.showModal();
}

document.addEventListener("click", async ev => {
  const t = ev.target;
  if (t.dataset.tab) { state.tab = t.dataset.tab; drawParams(); }
  if (t.dataset.set) {
    const input = document.querySelector(`input[data-param="${CSS.escape(t.dataset.set)}"]`);
    const reply = await post("/api/param", {service: state.tab, name: t.dataset.set, value: input.value});
    showReply("param-reply", reply, r => `${state.tab}.${r.name}: ${r.old} → ${r.value}`);
    input.blur();
  }
  if (t.dataset.cmd !== undefined) {
    const c = state.commands[+t.dataset.cmd];
    const args = Object.entries(c.args).map(([k, v]) => ` ${k}=${v}`).join("");
    const run = async () => showReply("cmd-reply", await post("/api/cmd", {service: c.service, command: c.command, args: c.args}),
                                      r => `${c.service} ${c.command}${args}: ${JSON.stringify(r)}`);
    if (c.confirm) confirmThen(`${c.service} ${c.command}${args}: this moves or energizes the hardware. Go on?`, run); else run();
  }
  if (t.dataset.window) {
    state.window_s = +t.dataset.window;
    ws.send(JSON.stringify({window_s: state.window_s}));
    drawWindows();
  }
});
document.getElementById("revert").addEventListener("click", async () => {
  if (!state.tab) return;
  showReply("param-reply", await post("/api/revert", {service: state.tab}), r => `${state.tab}: reverted ${JSON.stringify(r)}`);
});
document.addEventListener("keydown", ev => {
  if (ev.key === "Enter" && ev.target.dataset && ev.target.dataset.param) {
    document.querySelector(`button[data-set="${CSS.escape(ev.target.dataset.param)}"]`).click();
  }
});

let windows = [10, 60, 600, 3600];
function drawWindows() {
  const label = s => s < 60 ? `${s} s` : s < 3600 ? `${s / 60} min` : `${s / 3600} h`;
  document.getElementById("windows").innerHTML = windows.map(w => `<button class="small ${w === state.window_s ? "active" : ""}" data-window="${w}">${label(w)}</button>`).join("");
}

let ws;
function connect() {
  ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`);
  ws.onopen = () => ws.send(JSON.stringify({window_s: state.window_s}));
  ws.onmessage = ev => {
    const msg = JSON.parse(ev.data);
    document.getElementById("instrument").textContent = msg.instrument;
    const conn = document.getElementById("connection");
    conn.textContent = msg.connection === "connected" ? "bus connected" : msg.connection;
    conn.className = "pill " + (msg.connection === "connected" ? "ok" : "bad");
    document.getElementById("clock").textContent = hhmmss(msg.now_utc_s) + " UTC";
    if (msg.units) {
      state.units = msg.units; state.commands = msg.commands; windows = msg.windows_s;
      state.unmeasured = msg.unmeasured;
      if (!state.charts.length) buildCharts();
      drawWindows();
    }
    if (msg.params) { state.params = msg.params; drawParams(); }
    mergeTraces(msg);
    drawCharts(msg);
    drawPanels(msg);
    drawCommands();
    drawEvents(msg);
    document.getElementById("footer").textContent =
      `${msg.counters.messages || 0} bus messages, ${msg.counters.frames || 0} frames, ${msg.counters.undecodable || 0} undecodable · ` +
      `${msg.k > 1 ? `each point the mean of ${msg.k} bins of ${1000 / msg.bin_hz} ms` : `bins of ${1000 / msg.bin_hz} ms`} · ` +
      `display pushes dropped: ${msg.dropped} · stale after ${msg.stale_after_s} s without a heartbeat`;
  };
  ws.onclose = () => {
    const conn = document.getElementById("connection");
    conn.textContent = "dashboard server lost: reconnecting"; conn.className = "pill bad";
    setTimeout(connect, 1000);
  };
}
window.addEventListener("resize", () => state.charts.forEach(ch => ch.plot.setSize({width: Math.max(300, ch.div.clientWidth - 12), height: 150})));
connect();
