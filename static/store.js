/* The jobs the page knows: each job's latest view from the API (patched by live events), the
 * listing on the jobs page (ids newest first, and the total), and recent step times for the
 * progress line's rate. Views and the live-events module change it only through these
 * functions (live events are applied here too), and hear about changes through `on(event, fn)`:
 *   "merged" (job)   a job view was stored (live.js then picks which jobs to stream)
 *   "status" (job)   a job's status changed
 *   "render" (job)   its numbers changed; batched to one call per job per animation frame
 *   "acted" (id)     the user changed the job on the server (cancel, resume)
 *   "removed" (id)   the server no longer has the job
 *   "deleted" (id)   the user deleted it */

export const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
export const ACTIVE = new Set(["queued", "running", "cancelling"]);
export const STREAMING = new Set(["running", "cancelling"]);

const jobs = new Map(); // id -> job view from the API, patched by SSE events
let order = []; // ids on the jobs page, newest first
let total = 0;
const rates = new Map(); // id -> [[ms, step]...] from SSE step events

const subs = {};
export function on(event, fn) { (subs[event] ||= []).push(fn); }
function emit(event, arg) { for (const f of subs[event] || []) f(arg); }

export const job = (id) => jobs.get(id);
export const listed = () => order;
export const listedTotal = () => total;

/** Store a job view from the API. */
export function merge(j) {
  const old = jobs.get(j.id);
  jobs.set(j.id, j);
  if (old && old.status !== j.status) emit("status", j);
  emit("merged", j);
  return j;
}

/** Keep a job view only if the page has none yet (no events). */
export function remember(j) {
  if (!jobs.has(j.id)) jobs.set(j.id, j);
}

export const acted = (id) => emit("acted", id);

/** A live `status` event: {status, error?}. */
export function applyStatus(id, d) {
  const j = jobs.get(id);
  if (!j || j.status === d.status) return;
  j.status = d.status;
  if (d.error) j.error = d.error;
  emit("status", j);
}

/** A live `started` event: {total_steps, resumed_from_step}; false for an unknown job. */
export function applyStarted(id, d) {
  const j = jobs.get(id);
  if (!j) return false;
  j.progress.total_steps = d.total_steps;
  j.progress.resumed_from_step = d.resumed_from_step;
  return true;
}

/** A live `step` event (one metric row); false for an unknown job. */
export function applyStep(id, d) {
  const j = jobs.get(id);
  if (!j) return false;
  const p = j.progress;
  p.step = d.step;
  p.epoch = d.epoch;
  if (p.total_steps) p.fraction = Math.min(1, d.step / p.total_steps);
  const m = j.metrics;
  m.loss = d.loss;
  m.lr = d.lr;
  m.loss_scale = d.loss_scale;
  m.tokens_per_s = d.tokens_per_s;
  if (d.step_ms > 0) m.steps_per_s = 1000 / d.step_ms;
  if (d.skipped) m.skipped_steps = (m.skipped_steps || 0) + 1;
  noteStep(id, d.step);
  return true;
}

export function setListing(ids, n) {
  order = ids;
  total = n;
}

/** The jobs page's filter changed: its listing starts empty. */
export function clearListing() {
  order = [];
}

export function removed(id) {
  jobs.delete(id);
  emit("removed", id);
}

export function deleted(id) {
  jobs.delete(id);
  if (order.includes(id)) total = Math.max(0, total - 1);
  order = order.filter((i) => i !== id);
  emit("deleted", id);
}

/** Remember when a live step came, for `stepRate`. */
function noteStep(id, step) {
  const r = rates.get(id) || [];
  const now = Date.now();
  r.push([now, step]);
  while (r.length > 2 && now - r[0][0] > 10000) r.shift();
  rates.set(id, r);
}

/** Steps per second over the live step events of the last ~10 s, or null. */
export function stepRate(id) {
  const samples = rates.get(id);
  if (samples && samples.length >= 2) {
    const [t0, s0] = samples[0], [t1, s1] = samples[samples.length - 1];
    if (t1 - t0 >= 1000 && s1 > s0) return ((s1 - s0) * 1000) / (t1 - t0);
  }
  return null;
}

const pendingRender = new Set();
let renderQueued = false;
/** The job's numbers changed: emit "render" for it on the next animation frame. */
export function touch(id) {
  pendingRender.add(id);
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    for (const i of pendingRender) {
      const j = jobs.get(i);
      if (j) emit("render", j);
    }
    pendingRender.clear();
  });
}
