/* Downloads from the charts: a drawn chart as PNG or SVG (chart.js renders them), and a job's
 * every metric row as CSV (paged from the API, with elapsed_s = running sum of step_ms). */
import { $, h, toast } from "./dom.js";
import { api } from "./api.js";
import { Chart } from "./chart.js";

function saveBlob(blob, filename) {
  const url = URL.createObjectURL(blob);
  const a = h("a", { href: url, download: filename, hidden: true });
  document.body.appendChild(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}

function fileStem(job, what) {
  const name = job && job.name ? job.name.replace(/[^A-Za-z0-9._-]+/g, "-") : "job";
  return `job-${job ? job.id : "x"}-${name}-${what}`;
}

/** PNG and SVG buttons on a chart card; `what` names the file, `title` heads the picture. */
export function chartButtons(hostId, what, title, jobOf, headingOf, stem) {
  const save = async (kind) => {
    const host = $(hostId);
    const job = jobOf();
    const heading = headingOf ? headingOf() : job ? `${title} · #${job.id} ${job.name}` : title;
    try {
      const blob = kind === "svg"
        ? (() => { const t = Chart.svgText(host, heading); return t && new Blob([t], { type: "image/svg+xml" }); })()
        : await Chart.pngBlob(host, heading);
      if (!blob) { toast("This chart has no data to download yet.", "error"); return; }
      saveBlob(blob, `${stem || fileStem(job, what)}.${kind}`);
    } catch (e) {
      toast(`Could not make the ${kind.toUpperCase()}: ${e.message}`, "error");
    }
  };
  return ["png", "svg"].map((kind) => h("button", {
    type: "button", class: "btn small ghost", "data-download": kind,
    "aria-label": `Download the ${title.toLowerCase()} chart as ${kind.toUpperCase()}`, onclick: () => save(kind),
  }, kind.toUpperCase()));
}

const CSV_COLUMNS = ["step", "epoch", "loss", "lr", "loss_scale", "found_inf", "skipped", "grad_norm", "tokens_per_s", "step_ms"];

/** Every metric row of a job (paged, not downsampled) as CSV, with elapsed_s = running sum of step_ms. */
async function metricsCsv(id) {
  const lines = [[...CSV_COLUMNS, "elapsed_s"].join(",")];
  let after = 0, elapsedMs = 0;
  for (;;) {
    const r = await api(`/api/jobs/${id}/metrics?after_step=${after}&limit=100000`);
    if (!r.points.length) break;
    for (const p of r.points) {
      elapsedMs += p.step_ms > 0 ? p.step_ms : 0;
      const cells = CSV_COLUMNS.map((k) => (p[k] === null || p[k] === undefined ? "" : typeof p[k] === "boolean" ? (p[k] ? 1 : 0) : p[k]));
      lines.push([...cells, (elapsedMs / 1000).toFixed(3)].join(","));
    }
    if (r.next_after_step === null || r.next_after_step === undefined || r.next_after_step <= after) break;
    after = r.next_after_step;
  }
  return lines.join("\n") + "\n";
}

export function csvButton(jobOf) {
  return h("button", {
    type: "button", class: "btn small ghost", "data-download": "csv", "aria-label": "Download every metric row as CSV",
    onclick: async () => {
      const job = jobOf();
      if (!job) return;
      try {
        saveBlob(new Blob([await metricsCsv(job.id)], { type: "text/csv" }), `${fileStem(job, "metrics")}.csv`);
      } catch (e) {
        toast(`Could not download the metrics: ${e.message}`, "error");
      }
    },
  }, "CSV");
}
