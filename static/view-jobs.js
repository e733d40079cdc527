/* The jobs view (#/jobs): the table of jobs, newest first, with a status filter. Rows are kept
 * and patched in place (live step events redraw only their cells); the list itself is
 * refetched on a timer whose period depends on whether anything is running unstreamed. */
import { $, h, toast } from "./dom.js";
import { api } from "./api.js";
import { fmt } from "./format.js";
import * as store from "./store.js";
import { ACTIVE, STREAMING } from "./store.js";
import * as live from "./live.js";
import * as router from "./router.js";
import { badge, precisionOf, progressBar, progressText } from "./job-status.js";
import { actionButtons } from "./actions.js";
import * as nodes from "./view-nodes.js";

let lastFetch = 0;

export async function refresh() {
  lastFetch = Date.now();
  const status = $("jobs-filter").value;
  try {
    const data = await api(`/api/jobs?limit=100${status ? "&status=" + status : ""}`);
    const ids = data.jobs.map((j) => j.id);
    for (const j of data.jobs) {
      // Keep SSE-fed numbers that are newer than the list's.
      const old = store.job(j.id);
      if (old && live.streaming(j.id) && old.status === j.status && (old.progress.step || 0) > (j.progress.step || 0)) {
        j.progress = old.progress;
        j.metrics = old.metrics;
      }
      store.merge(j);
    }
    store.setListing(ids, data.total);
    await nodes.refresh();
    renderAll();
    live.syncStreams();
  } catch (e) {
    if (e.status !== 0) toast(`Could not load jobs: ${e.message}`, "error");
  }
}

function renderEmpty() {
  const filtered = $("jobs-filter").value;
  const order = store.listed(), total = store.listedTotal();
  $("jobs-empty").hidden = order.length > 0 || !!filtered;
  $("jobs-table").hidden = order.length === 0 && !filtered;
  $("jobs-total").textContent = total > order.length ? `Showing the newest ${order.length} of ${total} jobs.` : "";
}

function renderAll() {
  const body = $("jobs-body");
  const order = store.listed();
  const want = order.map((id) => "job-row-" + id);
  for (const row of Array.from(body.children)) if (!want.includes(row.id)) row.remove();
  let prev = null;
  for (const id of order) {
    const job = store.job(id);
    let row = $("job-row-" + id);
    if (!row) row = renderRow(job, true);
    else renderRow(job);
    const expected = prev ? prev.nextSibling : body.firstChild;
    if (row !== expected) body.insertBefore(row, expected);
    prev = row;
  }
  renderEmpty();
}

/** Patch the job's row in place (create it when `create`); null when it has none. */
function renderRow(job, create) {
  let row = $("job-row-" + job.id);
  if (!row) {
    if (!create) return null;
    row = h("tr", { id: "job-row-" + job.id, dataset: { id: job.id } },
      h("td", { class: "num", "data-label": "ID", text: job.id }),
      h("td", { class: "name-cell", "data-label": "Name" }),
      h("td", { class: "status-cell", "data-label": "Status" }),
      h("td", { class: "prec-cell", "data-label": "Precision" }),
      h("td", { class: "dev-cell", "data-label": "Device" }),
      h("td", { class: "progress-cell", "data-label": "Progress" }),
      h("td", { class: "num loss-cell", "data-label": "Loss" }),
      h("td", { class: "num scale-cell", "data-label": "Loss scale" }),
      h("td", { class: "num skip-cell", "data-label": "Skipped" }),
      h("td", { class: "actions-cell", "data-label": "Actions" }));
    $("jobs-body").append(row);
  }
  const c = row.children;
  if (row.dataset.name !== job.name) {
    row.dataset.name = job.name;
    c[1].replaceChildren(h("a", { class: "name", href: `#/jobs/${job.id}`, text: job.name }));
  }
  if (row.dataset.status !== job.status) {
    row.dataset.status = job.status;
    c[2].replaceChildren(badge(job.status));
    if (job.status === "failed" && job.error) c[2].append(h("span", { class: "sub", title: job.error, text: job.error.slice(0, 80) }));
    c[9].replaceChildren(h("div", { class: "row-actions" }, actionButtons(job, { small: true })));
  }
  c[3].replaceChildren(h("span", { class: "tag", text: precisionOf(job) }));
  // the node, once several share the database
  const onNode = job.node && nodes.list().length > 1 ? ` · ${job.node}` : "";
  c[4].textContent = job.device ? job.device + onNode : "–";
  const bar = progressBar(job);
  c[5].replaceChildren(bar, h("div", { class: "progress-text", text: progressText(job) }));
  c[6].textContent = fmt.num(job.metrics.loss);
  c[7].textContent = fmt.scale(job.metrics.loss_scale);
  c[8].textContent = fmt.int(job.metrics.skipped_steps);
  return row;
}

function removeRow(id) {
  const row = $("job-row-" + id);
  if (row) row.remove();
}

export function enter() {
  refresh();
}

/** Once a second: refetch the list when due, else tick the running rows' clocks. */
export function tick(now) {
  const order = store.listed();
  const active = order.some((id) => ACTIVE.has((store.job(id) || {}).status));
  const unstreamed = order.some((id) => STREAMING.has((store.job(id) || {}).status) && !live.streaming(id));
  const every = unstreamed ? 2000 : active ? 4000 : 5000;
  if (now - lastFetch >= every) refresh();
  else for (const id of order) { const j = store.job(id); if (j && j.status === "running") renderRow(j); }
}

export function init() {
  $("jobs-filter").addEventListener("change", () => { store.clearListing(); $("jobs-body").replaceChildren(); refresh(); });
  store.on("status", (job) => renderRow(job));
  store.on("render", (job) => renderRow(job));
  store.on("removed", removeRow);
  store.on("deleted", (id) => { removeRow(id); renderEmpty(); });
  store.on("acted", () => { if (router.current() === "jobs") refresh(); });
}
