/* The buttons that change a job (cancel, resume, export, delete), shared by the jobs table and
 * the job page. They report through the store ("acted", "deleted"), so whichever view is open
 * refreshes itself; export also serves the checkpoints table. */
import { h, toast, confirmDialog } from "./dom.js";
import { api } from "./api.js";
import * as store from "./store.js";
import { ACTIVE } from "./store.js";

export function actionButtons(job, opts = {}) {
  const label = `job ${job.id} (${job.name})`;
  const small = opts.small ? " small" : "";
  const btns = [];
  if (job.status === "queued" || job.status === "running")
    btns.push(h("button", { type: "button", class: "btn" + small, "aria-label": `Cancel ${label}`, onclick: () => jobAction(job, "cancel") }, "Cancel"));
  if (job.status === "cancelled" || job.status === "failed")
    btns.push(h("button", { type: "button", class: "btn" + small, "aria-label": `Resume ${label}`, onclick: () => jobAction(job, "resume") }, "Resume"));
  if (!ACTIVE.has(job.status) && (job.progress || {}).step > 0)
    btns.push(h("button", { type: "button", class: "btn" + small, "aria-label": `Export a model from ${label}`, onclick: () => exportJob(job) }, "Export"));
  if (!(job.status === "running" || job.status === "cancelling"))
    btns.push(h("button", { type: "button", class: "btn danger" + small, "aria-label": `Delete ${label}`, onclick: () => deleteJob(job) }, "Delete"));
  return btns;
}

async function jobAction(job, what) {
  try {
    const updated = await api(`/api/jobs/${job.id}/${what}`, { method: "POST", body: {} });
    store.merge(updated);
    toast(what === "cancel" ? `Job ${job.id}: ${updated.status === "cancelling" ? "stopping after its current step (a checkpoint is kept)" : "cancelled"}` : `Job ${job.id} queued to resume from its latest checkpoint`);
    store.acted(job.id);
  } catch (e) {
    toast(`Could not ${what} job ${job.id}: ${e.message}`, "error");
  }
}

/** Export a model from the job's latest (or the given) checkpoint. */
export async function exportJob(job, checkpoint) {
  const q = checkpoint ? `?checkpoint=${encodeURIComponent(checkpoint)}` : "";
  try {
    const r = await api(`/api/jobs/${job.id}/export${q}`, { method: "POST", body: {} });
    const m = r && r.model;
    toast(m ? `Exported model #${m.id} (${m.name}); it is ready in Translate` : "Model exported");
  } catch (e) {
    if (e.status === 404 && e.code === "not_found" && /route/.test(e.message)) toast("This server cannot export models yet.", "error");
    else toast(`Could not export job ${job.id}: ${e.message}`, "error");
  }
}

async function deleteJob(job) {
  const ok = await confirmDialog(`Delete job ${job.id}?`, `“${job.name}”, its metrics, validations, checkpoints and run directory will be removed. This cannot be undone.`, "Delete job");
  if (!ok) return;
  try {
    await api(`/api/jobs/${job.id}`, { method: "DELETE" });
    store.deleted(job.id);
    toast(`Job ${job.id} deleted`);
  } catch (e) {
    toast(`Could not delete job ${job.id}: ${e.message}`, "error");
  }
}
