/* How a job's state reads on every view: the status badge, the tqdm-style progress line
 * (`step/total pct [elapsed<eta, rate]`, like the CLI's) and bar, and its precision. */
import { h } from "./dom.js";
import { fmt } from "./format.js";
import * as store from "./store.js";
import { TERMINAL } from "./store.js";

const SYMBOL = { queued: "◷", running: "▶", cancelling: "…", succeeded: "✓", failed: "✕", cancelled: "■" };

function rateOf(job) {
  const live = store.stepRate(job.id);
  if (live !== null) return live;
  return job.metrics && job.metrics.steps_per_s;
}

function elapsedOf(job) {
  if (!job.started_at) return null;
  const start = Date.parse(job.started_at);
  const end = job.finished_at && TERMINAL.has(job.status) ? Date.parse(job.finished_at) : Date.now();
  return Math.max(0, (end - start) / 1000);
}

/** `step/total [elapsed<eta, rate]` like the CLI's tqdm line. */
export function progressText(job) {
  const p = job.progress || {};
  const step = p.step || 0;
  const total = p.total_steps;
  if (job.status === "queued" && !step) return "waiting for a worker";
  const rate = rateOf(job);
  const elapsed = elapsedOf(job);
  const left = total ? Math.max(0, total - step) : null;
  let eta = "?";
  if (TERMINAL.has(job.status)) eta = "00:00";
  else if (left !== null && rate > 0) eta = fmt.dur(left / rate);
  const pct = total ? ` ${Math.floor((100 * step) / total)}%` : "";
  return `${step}/${total || "?"}${pct} [${fmt.dur(elapsed)}<${eta}, ${fmt.rate(rate)}]`;
}

export function progressBar(job) {
  const p = job.progress || {};
  const frac = p.fraction !== null && p.fraction !== undefined ? p.fraction : 0;
  const cls = job.status === "succeeded" ? "bar done" : job.status === "failed" ? "bar failed" : job.status === "cancelled" ? "bar stopped" : "bar";
  const pct = Math.round(frac * 1000) / 10;
  return h("div", { class: cls, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct, "aria-label": `Progress of job ${job.id}: ${pct}%` },
    h("span", { style: `width:${Math.min(100, pct)}%` }));
}

export function badge(status) {
  return h("span", { class: "badge " + status, dataset: { status } }, h("span", { class: "sym", "aria-hidden": "true", text: SYMBOL[status] || "?" }), status);
}

export function precisionOf(job) {
  return (job.spec && job.spec.train && job.spec.train.precision) || "–";
}
