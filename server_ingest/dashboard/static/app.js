// tilebridge dashboard: first paint from /api/state, then live updates from /events (SSE).
// Every string from the broker is untrusted (device names, error texts): it only ever goes
// into textContent or attribute values, never into markup.
"use strict";

const RECENT_SHOWN = 6; // finished images kept as cards (newest first) below the running ones
const FINISHED_SHOWN = 25; // then this many more in the table
const RUNNING = new Set(["receiving", "storing"]);
const PROBLEM = new Set(["failed", "rejected"]);

const state = {
  entries: new Map(), // "kind|key" -> {kind, key, status, links, stale?, history?}
  previews: new Map(), // "device/image_id" -> version of its latest preview PNG
  monitor: { connected: false, last_error: null },
  stream: "connecting", // connecting | live | lost
  staleS: 60,
};

// -- data ------------------------------------------------------------------------------------

function applySnapshot(snapshot) {
  state.entries.clear();
  for (const entry of snapshot.entries) state.entries.set(`${entry.kind}|${entry.key}`, entry);
  state.previews = new Map(Object.entries(snapshot.previews || {}));
  state.monitor = snapshot.monitor;
  if (snapshot.stale_s) state.staleS = snapshot.stale_s;
  schedule();
}

function applyEvent(event) {
  if (event.type === "status") {
    state.entries.set(`${event.entry.kind}|${event.entry.key}`, event.entry);
  } else if (event.type === "remove") {
    state.entries.delete(`${event.kind}|${event.key}`);
  } else if (event.type === "monitor") {
    state.monitor = event.monitor;
  } else if (event.type === "preview") {
    if (event.version === null) state.previews.delete(event.key);
    else state.previews.set(event.key, event.version);
  }
  schedule();
}

function entriesOf(kind) {
  return [...state.entries.values()].filter((e) => e.kind === kind);
}

function connect() {
  const source = new EventSource("/events");
  source.addEventListener("open", () => { state.stream = "live"; schedule(); });
  source.addEventListener("error", () => { state.stream = "lost"; schedule(); });
  source.addEventListener("snapshot", (e) => applySnapshot(JSON.parse(e.data)));
  for (const type of ["status", "remove", "monitor", "preview"]) {
    source.addEventListener(type, (e) => applyEvent(JSON.parse(e.data)));
  }
}

// -- formatting ------------------------------------------------------------------------------

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i === 0 || n >= 100 ? 0 : 1)} ${units[i]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  return `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
}

function ago(iso) {
  return `${duration((Date.now() - Date.parse(iso)) / 1000)} ago`;
}

// A relative time that the clock tick refreshes in place (re-rendering everything every
// second would reset an operator's text selection, e.g. while copying an error message).
function since(iso, prefix) {
  return h("span", { "data-since": iso, "data-prefix": prefix || "" }, `${prefix || ""}${ago(iso)}`);
}

function tick() {
  for (const el of document.querySelectorAll("[data-since]")) {
    el.textContent = `${el.dataset.prefix}${ago(el.dataset.since)}`;
  }
}

function tiles(n) {
  return `${n} ${n === 1 ? "tile" : "tiles"}`;
}

function percent(part, total) {
  if (!total) return 0;
  return Math.min(100, Math.floor((100 * part) / total));
}

// -- DOM helpers -----------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function fact(label, value, cls) {
  return h("div", { class: `fact ${cls || ""}` }, h("dt", {}, label), h("dd", {}, value));
}

function badge(text, cls) {
  return h("span", { class: `badge ${cls}` }, text);
}

function bar(name, label, value, total) {
  const pct = percent(value, total);
  const fill = h("span", { class: "bar-fill" });
  fill.style.width = `${pct}%`; // CSSOM, not a style attribute: the CSP forbids inline styles
  return h("div", { class: `bar bar-${name}`, "data-bar": name },
    h("span", { class: "bar-label" }, label),
    h("span", { class: "bar-track", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": total,
                "aria-valuenow": value, "aria-label": label },
      fill),
    h("span", { class: "bar-value" }, `${value} / ${total}`),
    h("span", { class: "bar-percent" }, `${pct} %`));
}

function replace(container, children, emptyText) {
  container.replaceChildren(...(children.length ? children : [h("p", { class: "empty" }, emptyText)]));
}

// -- views -----------------------------------------------------------------------------------

const SVG = "http://www.w3.org/2000/svg";

// Upload rate over the last status messages, as an SVG line (no inline styles: the CSP).
function throughputChart(history) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("class", "throughput");
  svg.setAttribute("viewBox", "0 0 120 30");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("role", "img");
  const peak = Math.max(...history, 1);
  svg.setAttribute("aria-label", `upload rate, peak ${bytes(peak)}/s`);
  svg.dataset.peak = String(peak);
  const step = history.length > 1 ? 120 / (history.length - 1) : 0;
  const points = history.map((v, i) => `${(i * step).toFixed(1)},${(29 - (28 * v) / peak).toFixed(1)}`);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", points.join(" "));
  svg.append(line);
  return h("div", { class: "chart", title: `upload rate, last ${history.length} reports (peak ${bytes(peak)}/s)` },
    svg, h("span", { class: "chart-label" }, `peak ${bytes(peak)}/s`));
}

function deviceCard(entry) {
  const s = entry.status;
  const online = s.state === "online" && !entry.stale;
  const cls = ["card", "device", online ? "online" : "offline", s.last_error ? "has-error" : ""];
  const backends = Object.entries(s.backends || {}).map(([name, b]) =>
    h("div", { class: `edge-backend ${b.state === "failed" ? "has-error" : ""}` },
      bar(`edge-${name}`, name, b.frames_written, b.frames_total),
      b.error ? h("p", { class: "error" }, b.error) : null));
  return h("article", { class: cls.join(" "), "data-device": s.device, "data-stale": entry.stale ? "" : null },
    h("header", {},
      h("h3", {}, s.device),
      badge(online ? "online" : "offline", online ? "ok" : "off")),
    h("p", { class: "meta" },
      s.current_experiment ? `experiment ${s.current_experiment} · ` : "",
      since(s.at, "updated "),
      entry.stale ? ` · silent for over ${duration(state.staleS)}: revoked, cut off or switched off` : "",
      online && !s.broker_connected ? " · broker unreachable" : ""),
    entry.history && entry.history.length > 1 ? throughputChart(entry.history) : null,
    h("dl", { class: "facts" },
      fact("Waiting to upload", `${tiles(s.buffered_tiles)} · ${bytes(s.buffered_bytes)}`,
           s.buffered_tiles > 0 ? "busy" : ""),
      fact("Oldest waiting", s.oldest_pending_age_s === null ? "nothing waiting" : duration(s.oldest_pending_age_s)),
      fact("In flight", tiles(s.inflight_tiles)),
      fact("Upload rate", `${bytes(s.throughput_bytes_per_s)}/s`),
      fact("Committed", tiles(s.committed_tiles)),
      fact("Resent · refused", `${s.retransmits} · ${s.rejected_tiles}`, s.rejected_tiles > 0 ? "bad" : ""),
      fact("Disk free", bytes(s.disk_free_bytes))),
    backends.length ? h("div", { class: "edge-backends" }, backends) : null,
    s.last_error ? h("p", { class: "error", "data-error": "" }, s.last_error) : null);
}

function ingestCard(entry) {
  const s = entry.status;
  const online = s.state === "online";
  const failing = Object.entries(s.backends || {}).filter(([, v]) => v !== "ok");
  const cls = ["card", "ingest", online ? "online" : "offline",
               s.last_error || failing.length ? "has-error" : ""];
  return h("article", { class: cls.join(" "), "data-ingest": s.instance },
    h("header", {}, h("h3", {}, s.instance), badge(online ? "online" : "offline", online ? "ok" : "off")),
    h("p", { class: "meta" }, since(s.at, "updated "), online && !s.broker_connected ? " · broker unreachable" : ""),
    h("dl", { class: "facts" },
      fact("Images in progress", s.images_in_progress),
      fact("Staged on disk", bytes(s.staging_bytes)),
      fact("Staging disk free", bytes(s.staging_free_bytes),
           s.disk_pressure && s.disk_pressure !== "none" ? "bad" : ""),
      fact("Failed, still staged", s.images_failed || 0, s.images_failed ? "bad" : ""),
      fact("Tiles committed", s.tiles_committed),
      fact("Chunks refused", s.chunks_rejected, s.chunks_rejected > 0 ? "bad" : "")),
    h("ul", { class: "targets" }, Object.entries(s.backends || {}).map(([name, v]) => {
      const waiting = (s.images_waiting || {})[name] || 0;
      return h("li", { class: v === "ok" ? "ok" : "bad", "data-target": name },
        h("strong", {}, name), " ", badge(v === "ok" ? "ok" : "failing", v === "ok" ? "ok" : "bad"),
        waiting ? ` · ${waiting} image${waiting === 1 ? "" : "s"} waiting` : "",
        v === "ok" ? null : h("span", { class: "detail" }, v));
    })),
    s.disk_pressure && s.disk_pressure !== "none"
      ? h("p", { class: "error", "data-pressure": s.disk_pressure },
          s.disk_pressure === "tiles_refused" ? "Staging disk nearly full: tiles are refused until space is freed"
            : "Staging disk low: new images are refused; images already receiving go on")
      : null,
    s.last_error ? h("p", { class: "error", "data-error": "" }, s.last_error) : null);
}

// Images the ingest keeps staged for an administrator, with the command that resolves them.
function attentionRow(item, instance) {
  return h("tr", { "data-held": item.image_id, class: "has-error" },
    h("td", { title: item.image_id }, item.image_name),
    h("td", {}, item.device),
    h("td", {}, item.phase === "failed" ? "failed" : "abandoned"),
    h("td", {}, item.reason ? `${item.reason}: ${item.detail || ""}` : item.detail || ""),
    h("td", {}, bytes(item.staged_bytes)),
    h("td", {}, item.command ? h("code", { class: "command" }, item.command) : "–"),
    h("td", {}, instance));
}

const PHASE_TEXT = {
  receiving: "receiving tiles",
  storing: "writing to storage",
  complete: "stored",
  failed: "failed",
  rejected: "refused",
};

function omeroLink(entry) {
  return entry.links && entry.links.omero
    ? h("a", { href: entry.links.omero, target: "_blank", rel: "noopener noreferrer", class: "omero" },
        "open in OMERO")
    : null;
}

function preview(s) {
  const key = `${s.device}/${s.image_id}`;
  const version = state.previews.get(key);
  if (version === undefined) return null;
  const src = `/api/preview/${encodeURIComponent(s.device)}/${encodeURIComponent(s.image_id)}.png?v=${version}`;
  return h("img", { class: "preview", src, alt: `mosaic preview of ${s.image_name}`, "data-version": version });
}

function where(s) {
  const archive = (s.locations || {}).archive;
  return archive ? h("p", { class: "where" }, "archive: ", h("code", { "data-archive": "" }, archive)) : null;
}

function imageCard(entry) {
  const s = entry.status;
  const problem = PROBLEM.has(s.phase) || s.error;
  const done = s.phase === "complete" ? percent(s.tiles_stored, s.tiles_total) : percent(s.tiles_committed, s.tiles_total);
  return h("article", { class: `image phase-${s.phase} ${problem ? "has-error" : ""}`,
                        "data-image": s.image_id, "data-phase": s.phase },
    h("header", {},
      h("h3", {}, s.image_name || s.image_id),
      badge(PHASE_TEXT[s.phase] || s.phase, PROBLEM.has(s.phase) ? "bad" : s.phase === "complete" ? "ok" : "busy"),
      h("span", { class: "meta" }, `${s.device} · ${s.experiment} · `, since(s.at, "updated ")),
      omeroLink(entry)),
    h("div", { class: "image-body" },
      preview(s),
      h("div", { class: "bars", title: `${done} %` },
        bar("received", "Received", s.tiles_received, s.tiles_total),
        bar("committed", "Committed", s.tiles_committed, s.tiles_total),
        bar("stored", "Stored", s.tiles_stored, s.tiles_total),
        where(s))),
    s.error ? h("p", { class: "error", "data-error": "" }, s.error) : null);
}

function finishedRow(entry) {
  const s = entry.status;
  const where = Object.entries(s.locations || {}).map(([k, v]) => `${k}: ${v}`).join("\n");
  return h("tr", { "data-image": s.image_id, class: PROBLEM.has(s.phase) ? "has-error" : "" },
    h("td", { title: s.image_id }, s.image_name || s.image_id),
    h("td", {}, s.device),
    h("td", {}, s.experiment),
    h("td", {}, `${s.tiles_stored} / ${s.tiles_total}`),
    h("td", { title: where }, badge(PHASE_TEXT[s.phase], s.phase === "complete" ? "ok" : "bad"), " ", omeroLink(entry)),
    h("td", {}, since(s.at)));
}

function alertsOf(devices, ingests, images) {
  const alerts = [];
  for (const s of images.filter((e) => PROBLEM.has(e.status.phase)).map((e) => e.status)) {
    alerts.push([`Image ${s.image_name || s.image_id} from ${s.device} ${PHASE_TEXT[s.phase]}`, s.error]);
  }
  for (const s of images.filter((e) => RUNNING.has(e.status.phase) && e.status.error).map((e) => e.status)) {
    alerts.push([`Image ${s.image_name || s.image_id} from ${s.device} is delayed`, s.error]);
  }
  for (const e of devices) {
    const s = e.status;
    if (e.stale && s.state === "online") alerts.push([`Microscope ${s.device} is offline`, `no status for over ${duration(state.staleS)} (revoked, cut off or switched off)`]);
    else if (s.state !== "online") alerts.push([`Microscope ${s.device} is offline`, s.buffered_tiles ? `${tiles(s.buffered_tiles)} still waiting on it` : null]);
    else if (s.last_error) alerts.push([`Microscope ${s.device}`, s.last_error]);
  }
  for (const e of ingests) {
    const s = e.status;
    if (s.state !== "online" || e.stale) alerts.push([`Ingest ${s.instance} is offline`, e.stale ? "no status for a while" : null]);
    else if (s.last_error) alerts.push([`Ingest ${s.instance}`, s.last_error]);
    if (s.disk_pressure && s.disk_pressure !== "none") alerts.push([`Ingest ${s.instance}: staging disk low`, `${bytes(s.staging_free_bytes)} free`]);
    for (const [name, v] of Object.entries(s.backends || {})) {
      if (v !== "ok") alerts.push([`Storage ${name} on ${s.instance} is failing`, v]);
    }
  }
  return alerts;
}

function renderConnection() {
  const el = document.getElementById("connection");
  let text = "live";
  let cls = "ok";
  if (state.stream === "lost") { text = "connection to dashboard lost – retrying"; cls = "bad"; }
  else if (state.stream === "connecting") { text = "connecting…"; cls = "pending"; }
  else if (!state.monitor.connected) {
    text = `dashboard cannot reach the broker – status may be stale${state.monitor.last_error ? ` (${state.monitor.last_error})` : ""}`;
    cls = "bad";
  }
  el.textContent = text;
  el.className = `connection ${cls}`;
}

function render() {
  const byName = (a, b) => a.key.localeCompare(b.key);
  const devices = entriesOf("device").sort(byName);
  const ingests = entriesOf("ingest").sort(byName);
  const images = entriesOf("image");
  const newestFirst = (a, b) => Date.parse(b.status.at) - Date.parse(a.status.at);
  const running = images.filter((e) => RUNNING.has(e.status.phase))
    .sort((a, b) => `${a.status.device}/${a.status.image_name}`.localeCompare(`${b.status.device}/${b.status.image_name}`));
  const finished = images.filter((e) => !RUNNING.has(e.status.phase)).sort(newestFirst);
  const recent = finished.slice(0, RECENT_SHOWN);
  const earlier = finished.slice(RECENT_SHOWN, RECENT_SHOWN + FINISHED_SHOWN);

  renderConnection();
  const online = devices.filter((e) => e.status.state === "online").length;
  document.getElementById("device-summary").textContent = devices.length ? `${online} of ${devices.length} online` : "";
  replace(document.getElementById("devices"), devices.map(deviceCard), "No microscope has reported yet.");
  replace(document.getElementById("ingests"), ingests.map(ingestCard), "No ingest server has reported yet.");
  replace(document.getElementById("running"), running.map(imageCard), "No image is being transferred.");
  replace(document.getElementById("recent"), recent.map(imageCard), "No image has finished yet.");
  document.querySelector("#finished tbody").replaceChildren(...earlier.map(finishedRow));
  document.getElementById("earlier").hidden = earlier.length === 0;

  const held = ingests.flatMap((e) => (e.status.attention || []).map((item) => attentionRow(item, e.status.instance)));
  document.querySelector("#held tbody").replaceChildren(...held);
  document.getElementById("staged").hidden = held.length === 0;

  const alerts = alertsOf(devices, ingests, images);
  document.getElementById("attention").hidden = alerts.length === 0;
  document.getElementById("alerts").replaceChildren(...alerts.map(([title, detail]) =>
    h("li", { class: "alert" }, h("strong", {}, title), detail ? h("span", { class: "detail" }, detail) : null)));
}

let pending = false;
function schedule() {
  if (pending) return;
  pending = true;
  // Bursts of status messages during a scan collapse into one repaint per frame.
  requestAnimationFrame(() => { pending = false; render(); });
}

async function start() {
  try {
    const response = await fetch("/api/state", { cache: "no-store" });
    if (response.ok) applySnapshot(await response.json());
  } catch (err) {
    state.stream = "lost";
  }
  connect();
  setInterval(tick, 1000);
}

start();
