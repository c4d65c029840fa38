// The edgefl console: polls the JSON API (/api/status, /api/devices, /api/rounds) and renders it.
// Everything a device or a sender wrote (names, rejection details) is set as text, never as HTML.
"use strict";

const POLL_MS = 2000;
const table = { sort: "device", order: "asc", offset: 0, limit: 50, q: "", state: "all" };
let roundsSeen = -1;
let charts = null;

const $ = (id) => document.getElementById(id);

// control and format characters (newlines, bidi overrides, zero-width) shown as U+FFFD: a device name or a
// sender's words cannot rearrange or hide what the operator reads
const HIDDEN = /[\p{Cc}\p{Cf}]/gu;
function shown(value) { return value == null ? "–" : String(value).replace(HIDDEN, "\uFFFD"); }
function text(el, value) { el.textContent = shown(value); }

function fmtBytes(n) {
  if (n == null) return "–";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}
function fmtSeconds(s) {
  if (s == null) return "–";
  return s < 1 ? `${(s * 1000).toFixed(0)} ms` : `${s.toFixed(2)} s`;
}
function fmtAgo(epoch) {
  if (epoch == null) return "–";
  const s = Math.max(0, Date.now() / 1000 - epoch);
  if (s < 60) return `${s.toFixed(0)} s ago`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min ago`;
  return `${(s / 3600).toFixed(1)} h ago`;
}
function fmtTime(epoch) { return new Date(epoch * 1000).toLocaleTimeString(); }
function pct(x) { return x == null ? "–" : `${(100 * x).toFixed(2)}%`; }

async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin", cache: "no-store" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function renderStatus(s) {
  text($("run"), s.run);
  text($("meta"), `${s.strategy} · session ${s.session} · started ${fmtTime(s.started)}`);
  text($("round"), s.round);
  text($("rounds"), s.rounds);
  text($("rounds-done"), `${s.rounds_done} done${s.finished ? " · finished" : ""}`);
  const phase = s.phase || {};
  text($("phase"), phase.round != null && phase.name !== "finished" ? `${phase.name} (round ${phase.round})` : phase.name);
  const share = phase.total ? Math.min(1, phase.done / phase.total) : (phase.name === "finished" ? 1 : 0);
  $("progress").style.width = `${(100 * share).toFixed(1)}%`;
  text($("phase-detail"), phase.total ? `${phase.done.toLocaleString()} / ${phase.total.toLocaleString()} samples · since ${fmtTime(phase.since)}`
                                      : `since ${fmtTime(phase.since)}`);
  text($("accuracy"), pct(s.test_accuracy));
  text($("best"), s.best_test_accuracy == null ? "" : `best ${pct(s.best_test_accuracy)}`);
  const d = s.devices || {};
  text($("devices"), `${d.online ?? 0} / ${d.registered ?? 0}`);
  text($("device-states"), `${d.offline ?? 0} offline · ${d.quarantined ?? 0} quarantined`);
  text($("ingest"), `${fmtBytes(s.ingest_bytes_per_s)}/s`);
  const b = s.bytes || {};
  const w = s.ingest_workers || {};
  const shards = Object.entries(w.shards || {});
  const down = shards.filter(([, state]) => state !== "online").map(([k, state]) => `${k} ${state}`);
  const workers = w.workers ? ` · workers ${shards.length - down.length}/${w.workers} online${down.length ? ` (${down.join(", ")})` : ""}` : "";
  text($("bytes"), `up ${fmtBytes(b.up)} · down ${fmtBytes(b.down)} · resent ${fmtBytes(b.resent)} · rejected ${fmtBytes(b.rejected)}${workers}`);
  const reasons = Object.entries(s.rejections || {}).sort((a, b) => b[1] - a[1]);
  text($("rejections"), reasons.reduce((n, r) => n + r[1], 0));
  text($("rejection-reasons"), reasons.map(([k, v]) => `${k} ${v}`).join(" · "));
  const age = s.as_of ? Date.now() / 1000 - s.as_of : null;
  const notice = $("notice");
  notice.hidden = !(age != null && age > 15 && !s.finished);
  text(notice, notice.hidden ? "" : `figures as of ${fmtAgo(s.as_of)}: the runtime is busy (${phase.name})`);
  renderEvents(s.events || []);
  if (s.rounds_done !== roundsSeen) {
    roundsSeen = s.rounds_done;
    refreshRounds();
  }
}

function renderEvents(events) {
  const list = $("events");
  list.replaceChildren(...events.map((e) => {
    const li = document.createElement("li");
    li.dataset.kind = e.kind;
    const time = document.createElement("span"); time.className = "time"; time.textContent = fmtTime(e.time);
    const kind = document.createElement("span"); kind.className = `kind ${e.kind}`; kind.textContent = e.kind;
    const what = document.createElement("span");
    what.textContent = shown([e.device, e.detail].filter(Boolean).join(": "));
    li.append(time, kind, what);
    return li;
  }));
}

function cell(row, value, cls) {
  const td = document.createElement("td");
  td.textContent = shown(value);
  if (cls) td.className = cls;
  row.append(td);
  return td;
}

function renderDevices(page) {
  const body = document.querySelector("#devices-table tbody");
  body.replaceChildren(...page.devices.map((d) => {
    const tr = document.createElement("tr");
    tr.dataset.device = d.device;
    cell(tr, d.device, "device");
    cell(tr, d.profile);
    cell(tr, d.engine);
    const state = d.quarantined ? "quarantined" : (d.online ? "online" : "offline");
    cell(tr, state, `state ${state}`);
    cell(tr, fmtAgo(d.last_heartbeat), "heartbeat");
    const slow = d.step_time_s != null && d.predicted_step_s != null && d.step_time_s > 2 * d.predicted_step_s;
    cell(tr, fmtSeconds(d.step_time_s), `num step${slow ? " slow" : ""}`);
    cell(tr, fmtSeconds(d.predicted_step_s), "num");
    cell(tr, d.peak_rss_mb == null ? null : `${d.peak_rss_mb.toFixed(0)} MiB`, "num");
    cell(tr, fmtBytes(d.bytes_up), "num");
    cell(tr, fmtBytes(d.bytes_down), "num");
    cell(tr, d.compression == null ? null : `${d.compression.toFixed(1)}×`, "num");
    cell(tr, d.accepted_samples.toLocaleString(), "num");
    const reasons = Object.entries(d.rejection_reasons || {}).map(([k, v]) => `${k} ${v}`).join(", ");
    cell(tr, d.rejected ? `${d.rejected} (${reasons})` : "0", "rejections");
    const cause = d.quarantine_cause;
    cell(tr, d.quarantined && cause ? `until ${fmtTime(d.quarantined_until)}: ${cause.reason}: ${cause.detail}`
                                    : (d.quarantines ? `${d.quarantines} earlier` : ""), "quarantine");
    return tr;
  }));
  const last = Math.min(page.offset + page.limit, page.matched);
  text($("page"), page.matched ? `${page.offset + 1}–${last} of ${page.matched}` + (page.matched !== page.total ? ` (of ${page.total})` : "")
                               : `none of ${page.total}`);
  $("prev").disabled = page.offset === 0;
  $("next").disabled = last >= page.matched;
  document.querySelectorAll("#devices-table th[data-sort]").forEach((th) => {
    th.classList.toggle("sorted-asc", th.dataset.sort === table.sort && table.order === "asc");
    th.classList.toggle("sorted-desc", th.dataset.sort === table.sort && table.order === "desc");
  });
}

function chartOf(el, title, series) {
  if (typeof uPlot === "undefined") return null;
  return new uPlot({
    width: Math.max(320, el.clientWidth || 480), height: 200, title: "",
    scales: { x: { time: false } },
    axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500] }, {}],
    series: [{ label: "round" }, ...series.map(([label, stroke]) => ({ label, stroke, width: 2, points: { size: 5 } }))],
  }, [[], ...series.map(() => [])], el);
}

async function refreshRounds() {
  const data = await getJSON("/api/rounds");
  const rows = data.rounds;
  if (!charts) {
    charts = {
      acc: chartOf($("acc-chart"), "accuracy", [["test accuracy", "#2b6cb0"], ["mean device accuracy", "#38a169"]]),
      loss: chartOf($("loss-chart"), "loss", [["test loss", "#c53030"], ["server training loss", "#b7791f"]]),
    };
  }
  const x = rows.map((r) => r.round);
  if (charts.acc) charts.acc.setData([x, rows.map((r) => r.test_accuracy), rows.map((r) => r.mean_device_accuracy)]);
  if (charts.loss) charts.loss.setData([x, rows.map((r) => r.test_loss), rows.map((r) => r.server_loss)]);
}

async function refreshDevices() {
  const params = new URLSearchParams({ sort: table.sort, order: table.order, offset: table.offset, limit: table.limit,
                                       state: table.state, q: table.q });
  renderDevices(await getJSON(`/api/devices?${params}`));
}

async function poll() {
  try {
    renderStatus(await getJSON("/api/status"));
    await refreshDevices();
  } catch (e) {
    const notice = $("notice");
    notice.hidden = false;
    text(notice, `console not reachable: ${e.message} (the run may have ended)`);
  }
  setTimeout(poll, POLL_MS);
}

function wire() {
  document.querySelectorAll("#devices-table th[data-sort]").forEach((th) => th.addEventListener("click", () => {
    table.order = table.sort === th.dataset.sort && table.order === "asc" ? "desc" : "asc";
    table.sort = th.dataset.sort;
    table.offset = 0;
    refreshDevices();
  }));
  let typing = null;
  $("filter").addEventListener("input", (e) => {
    clearTimeout(typing);
    typing = setTimeout(() => { table.q = e.target.value; table.offset = 0; refreshDevices(); }, 250);
  });
  $("state").addEventListener("change", (e) => { table.state = e.target.value; table.offset = 0; refreshDevices(); });
  $("prev").addEventListener("click", () => { table.offset = Math.max(0, table.offset - table.limit); refreshDevices(); });
  $("next").addEventListener("click", () => { table.offset += table.limit; refreshDevices(); });
}

document.addEventListener("DOMContentLoaded", () => { wire(); poll(); });
