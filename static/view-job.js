/* The job view (#/jobs/<id>): header with progress and actions, the facts list, the charts
 * (loss, validation loss, BLEU/chrF, loss scale, throughput) with their downloads, sample
 * translations, checkpoints and the overflow panel. Live step events extend the loss curves
 * without refetching; without a stream the view polls. `open` is the job shown, owned here. */
import { $, h, toast, debounce } from "./dom.js";
import { api } from "./api.js";
import { fmt } from "./format.js";
import { Chart } from "./chart.js";
import * as store from "./store.js";
import { ACTIVE } from "./store.js";
import * as live from "./live.js";
import * as router from "./router.js";
import { badge, precisionOf, progressBar, progressText } from "./job-status.js";
import { actionButtons, exportJob } from "./actions.js";
import { chartButtons, csvButton } from "./downloads.js";
import { overflowPanel } from "./overflows.js";

let open = null; // {id, metrics, validations, checkpoints, ...} of the job shown

/** The id of the job shown, or null. */
export const openId = () => (open ? open.id : null);

export async function enter(r) {
  const id = r.id;
  open = { id, metrics: [], downsampled: false, validations: [], checkpoints: [], lastMetrics: 0, lastJob: 0, liveSince: 0 };
  $("h-job").textContent = `Job ${id}`;
  $("job-facts").replaceChildren();
  $("job-progress").replaceChildren();
  $("job-actions").replaceChildren();
  $("job-error").hidden = true;
  $("samples").replaceChildren();
  $("ckpts").replaceChildren();
  $("samples-step").replaceChildren();
  drawCharts();
  await refresh(true);
}

export function leave() {
  open = null;
}

async function refresh(all) {
  const d = open;
  if (!d) return;
  let job;
  try {
    job = await api(`/api/jobs/${d.id}`);
  } catch (e) {
    if (e.status === 404) {
      $("h-job").textContent = `Job ${d.id}`;
      $("job-progress").replaceChildren(h("p", { class: "alert error", text: `There is no job ${d.id} (it may have been deleted).` }));
      open = null;
    } else if (e.status !== 0) toast(`Could not load job ${d.id}: ${e.message}`, "error");
    return;
  }
  if (open !== d) return;
  d.lastJob = Date.now();
  store.merge(job);
  renderHeader(job, true);
  if (all) await Promise.all([loadMetrics(), loadValidations(), loadCheckpoints(), loadOverflows()]);
  else if (!live.streaming(d.id) && ACTIVE.has(job.status)) await Promise.all([loadMetrics(), loadValidations()]);
}

function renderHeader(job, full) {
  const d = open;
  if (!d || d.id !== job.id) return;
  $("h-job").replaceChildren(`${job.name} `, h("span", { class: "muted", text: `#${job.id}` }));
  $("job-progress").replaceChildren(
    h("div", { class: "card-head" }, badge(job.status), h("span", { class: "progress-text", id: "job-progress-text", text: progressText(job) })),
    progressBar(job));
  if (full || d.status !== job.status) {
    d.status = job.status;
    $("job-actions").replaceChildren(...actionButtons(job), h("a", { class: "btn", href: `#/compare?a=${job.id}` }, "Compare…"));
    const err = $("job-error");
    err.hidden = !job.error;
    err.textContent = job.error ? `This job failed: ${job.error}` : "";
  }
  const s = job.spec || {}, m = s.model || {}, t = s.train || {}, data = s.data || {}, mt = job.metrics || {}, p = job.progress || {};
  const base = (x) => (x ? String(x).split("/").slice(-2).join("/") : "–");
  const facts = [
    ["Precision", `${t.precision || "–"}${t.precision === "f16" || (s.amp && s.amp.enabled) ? " + loss scaling" : ""}`],
    ["Device", job.device || "–"],
    ["Model", m.d_model ? `d${m.d_model} · ${m.layers}+${m.layers} layers · ${m.heads} heads` : "–"],
    ["Data", `${base(data.train)} (${data.src_lang || "?"}→${data.tgt_lang || "?"})`],
    ["Batch", t.max_tokens ? `${t.max_tokens} tokens` : `${t.batch_size} sentences`],
    ["Step", `${fmt.int(p.step)} / ${p.total_steps ? fmt.int(p.total_steps) : "?"} (epoch ${p.epoch ?? "–"})`],
    ["Loss", fmt.num(mt.loss)],
    ["Val loss", fmt.num(mt.val_loss)],
    ["Best BLEU", mt.best_bleu !== null && mt.best_bleu !== undefined ? `${fmt.num(mt.best_bleu, 2)} @ ${mt.best_bleu_step}` : "–"],
    ["Tokens/s", fmt.int(mt.tokens_per_s)],
    ["Loss scale", fmt.scale(mt.loss_scale)],
    ["Skipped steps", fmt.int(mt.skipped_steps)],
    ["Started", fmt.time(job.started_at) + (job.attempts > 1 ? ` (attempt ${job.attempts})` : "")],
    ["Finished", fmt.time(job.finished_at)],
  ];
  if (job.parent_job_id !== null && job.parent_job_id !== undefined) {
    facts.splice(1, 0, ["Forked from", h("a", { id: "job-parent", href: `#/jobs/${job.parent_job_id}`, text: `job #${job.parent_job_id} at step ${fmt.int(job.parent_checkpoint)}` })]);
  }
  $("job-facts").replaceChildren(...facts.map(([k, v]) => h("div", null, h("dt", { text: k }), v instanceof Node ? h("dd", null, v) : h("dd", { text: v }))));
}

async function loadMetrics() {
  const d = open;
  if (!d) return;
  try {
    const r = await api(`/api/jobs/${d.id}/metrics?points=400`);
    if (open !== d) return;
    d.metrics = r.points;
    d.downsampled = r.downsampled;
    d.lastMetrics = Date.now();
    drawCharts();
  } catch (e) {
    if (e.status !== 0) toast(`Could not load metrics: ${e.message}`, "error");
  }
}

/** An SSE step for the open job: extend the curves without refetching. */
function liveStep(ev) {
  const d = open;
  const last = d.metrics[d.metrics.length - 1];
  if (last && ev.step <= last.step) return;
  d.metrics.push({ ...ev, bucket: 1 });
  if (d.metrics.length > 800) { loadMetrics(); return; }
  if (Date.now() - (d.lastDraw || 0) > 1000) drawCharts();
  else debounce("draw", drawCharts, 1000);
}

function scalerOn(job) {
  const s = (job && job.spec) || {};
  if (s.amp && s.amp.enabled !== null && s.amp.enabled !== undefined) return s.amp.enabled;
  return s.train && s.train.precision === "f16";
}

function drawCharts() {
  const d = open;
  if (!d) return;
  d.lastDraw = Date.now();
  const job = store.job(d.id);
  const pts = d.metrics;
  const exact = pts.every((p) => (p.bucket || 1) === 1);
  $("loss-note").textContent = pts.length
    ? exact ? `(${pts.length} steps)` : `(${pts.length} points; band = min–max loss in each group of steps)`
    : "";
  Chart.line($("chart-loss"), {
    label: "Training loss by step",
    xLabel: "step", yLabel: "loss", height: 260,
    yFormat: (v) => Chart.compact(v),
    series: [{ name: "loss", band: !exact, points: pts.map((p) => ({ x: p.step, y: p.loss, lo: p.loss_min, hi: p.loss_max, bucket: p.bucket })) }],
    empty: job && job.status === "queued" ? "Waiting for the first step" : "No steps recorded yet",
  });
  const on = scalerOn(job);
  // Marks come from each point's exact counts (bucket_skipped / bucket_overflowed), not from
  // scale drops: hysteresis or a floor at min_scale can hide an overflow from the scale.
  const scalePts = pts.map((p) => {
    const skipped = p.bucket_skipped ?? (p.skipped ? 1 : 0);
    const over = p.bucket_overflowed ?? (p.found_inf ? 1 : 0);
    let mark = skipped > 0 || over > 0, note = null;
    if (mark && (p.bucket || 1) === 1) note = "step skipped: inf/NaN gradients, scale backed off";
    else if (mark) note = `${skipped} of ${p.bucket} steps skipped (${over} with inf/NaN gradients)`;
    return { x: p.step, y: p.loss_scale, mark, note };
  });
  Chart.line($("chart-scale"), {
    label: "Loss scale by step, log axis", xLabel: "step", yLabel: "scale", log: true,
    series: [{ name: "loss scale", points: on ? scalePts : [] }],
    yFormat: (v) => fmt.scale(v),
    empty: job && !on ? `Loss scaling is off for this run (${precisionOf(job)})` : "No steps recorded yet",
  });
  Chart.line($("chart-tps"), {
    label: "Training throughput in target tokens per second", xLabel: "step", yLabel: "tokens/s", zero: true,
    series: [{ name: "tokens/s", points: pts.map((p) => ({ x: p.step, y: p.tokens_per_s })) }],
  });
  const v = d.validations;
  Chart.line($("chart-val"), {
    label: "Validation loss by step", xLabel: "step", yLabel: "val loss",
    series: [{ name: "val loss", points: v.map((x) => ({ x: x.step, y: x.val_loss })) }],
    empty: "No validation yet",
  });
  Chart.line($("chart-bleu"), {
    label: "Validation BLEU and chrF by step", xLabel: "step", yLabel: "score", zero: true, legend: true,
    series: [
      { name: "BLEU", points: v.map((x) => ({ x: x.step, y: x.bleu })) },
      { name: "chrF", points: v.map((x) => ({ x: x.step, y: x.chrf })) },
    ],
    yFormat: (x) => Chart.compact(x),
    empty: "No validation yet",
  });
}

async function loadValidations() {
  const d = open;
  if (!d) return;
  try {
    const r = await api(`/api/jobs/${d.id}/validations`);
    if (open !== d) return;
    d.validations = r.validations;
    drawCharts();
    const sel = $("samples-step");
    const cur = sel.value;
    sel.replaceChildren(...d.validations.slice().reverse().map((x) => h("option", { value: x.step, text: `${x.step} (BLEU ${fmt.num(x.bleu, 2)})` })));
    if (cur && d.validations.some((x) => String(x.step) === cur)) sel.value = cur;
    renderSamples();
  } catch (e) {
    if (e.status !== 0) toast(`Could not load validations: ${e.message}`, "error");
  }
}

function renderSamples() {
  const d = open;
  const out = $("samples");
  const step = Number($("samples-step").value);
  const v = d && d.validations.find((x) => x.step === step);
  $("samples-step").closest("label").hidden = !d || !d.validations.length;
  if (!v) {
    out.replaceChildren(h("p", { class: "muted", text: "Samples appear after the first validation (train.valid_every, or at the end of each epoch)." }));
    return;
  }
  const rows = (v.samples || []).map((s) => h("tr", null, h("td", { class: "src", text: s.source }), h("td", { text: s.reference }), h("td", { class: "hyp", text: s.hypothesis || "(empty)" })));
  out.replaceChildren(
    h("p", { class: "muted small tnum", text: `Step ${v.step}: val loss ${fmt.num(v.val_loss)}, BLEU ${fmt.num(v.bleu, 2)}, chrF ${fmt.num(v.chrf, 2)}, CER ${fmt.num(v.cer, 3)}, WER ${fmt.num(v.wer, 3)} over ${v.sentences} sentences.` }),
    rows.length
      ? h("div", { class: "table-wrap" }, h("table", { class: "samples" },
          h("thead", null, h("tr", null, h("th", { scope: "col", text: "Source" }), h("th", { scope: "col", text: "Reference" }), h("th", { scope: "col", text: "Model output" }))),
          h("tbody", null, rows)))
      : h("p", { class: "muted", text: "This validation kept no samples (train.valid_samples = 0)." }));
}

async function loadCheckpoints() {
  const d = open;
  if (!d) return;
  try {
    const r = await api(`/api/jobs/${d.id}/checkpoints`);
    if (open !== d) return;
    d.checkpoints = r.checkpoints;
    const job = store.job(d.id);
    const out = $("ckpts");
    if (!r.checkpoints.length) {
      out.replaceChildren(h("p", { class: "muted", text: "No checkpoints yet (checkpoint.every_steps, and one at the end)." }));
      return;
    }
    const canExport = job && !ACTIVE.has(job.status);
    out.replaceChildren(h("div", { class: "table-wrap" }, h("table", { class: "ckpts" },
      h("thead", null, h("tr", null, ["Step", "Epoch", "Size", "Val BLEU", "Best", "File", ""].map((t, i) => h("th", { scope: "col", class: i < 4 ? "num" : null, text: t })))),
      h("tbody", null, r.checkpoints.map((c) => h("tr", null,
        h("td", { class: "num", text: fmt.int(c.step) }),
        h("td", { class: "num", text: c.epoch }),
        h("td", { class: "num", text: fmt.bytes(c.size_bytes) }),
        h("td", { class: "num", text: fmt.num(c.val_bleu, 2) }),
        h("td", { text: c.is_best ? "★ best" : "" }),
        h("td", { text: c.exists ? "present" : "missing" }),
        h("td", null, canExport && c.exists ? h("button", { type: "button", class: "btn small", "aria-label": `Export a model from the checkpoint at step ${c.step}`, onclick: () => exportJob(job, String(c.step)) }, "Export") : null)))))));
  } catch (e) {
    if (e.status !== 0) toast(`Could not load checkpoints: ${e.message}`, "error");
  }
}

/** Overflow forensics: which tensors and layers overflow, how often, at which loss scales. */
async function loadOverflows() {
  const d = open;
  if (!d) return;
  try {
    const r = await api(`/api/jobs/${d.id}/overflows?recent=5`);
    if (open !== d) return;
    $("overflows").replaceChildren(...overflowPanel(d.id, r));
  } catch (e) {
    if (e.status !== 0) toast(`Could not load overflows: ${e.message}`, "error");
  }
}

const CHARTS = [
  ["chart-loss", "loss", "Training loss"],
  ["chart-val", "val-loss", "Validation loss"],
  ["chart-bleu", "bleu", "BLEU and chrF"],
  ["chart-scale", "loss-scale", "Loss scale"],
  ["chart-tps", "tokens-per-s", "Throughput"],
];

function addDownloads() {
  const jobOf = () => open && store.job(open.id);
  for (const [id, what, title] of CHARTS) {
    const cap = $(id).closest("figure").querySelector("figcaption");
    const extra = id === "chart-loss" ? [csvButton(jobOf)] : [];
    cap.appendChild(h("span", { class: "dl", role: "group", "aria-label": `Download ${title.toLowerCase()}` }, ...chartButtons(id, what, title, jobOf), ...extra));
  }
}

/** Once a second: poll the job when due (often when unstreamed), else tick its clock. */
export function tick(now) {
  const d = open;
  if (!d) return;
  const job = store.job(d.id);
  const streamed = live.streaming(d.id);
  const every = job && ACTIVE.has(job.status) ? (streamed ? 10000 : 2000) : 30000;
  if (now - d.lastJob >= every) refresh(false);
  else if (job && job.status === "running") { const t = $("job-progress-text"); if (t) t.textContent = progressText(job); }
}

/** Live events about the open job. */
function onLive(id, type, data) {
  if (!open || open.id !== id) return;
  if (type === "step") liveStep(data);
  else if (type === "validation") loadValidations();
  else if (type === "checkpoint") debounce("ckpts", loadCheckpoints, 500);
  else if (type === "overflow") debounce("overflows", loadOverflows, 1000);
  else if (type === "recovery") { loadOverflows(); loadMetrics(); }
}

export function init() {
  $("samples-step").addEventListener("change", renderSamples);
  addDownloads();
  live.onEvent(onLive);
  store.on("status", (job) => { if (open && open.id === job.id) refresh(true); });
  store.on("render", (job) => renderHeader(job));
  store.on("acted", (id) => { if (router.current() === "job" && open && open.id === id) refresh(true); });
  store.on("deleted", () => { if (router.current() === "job") location.hash = "#/jobs"; });
}
