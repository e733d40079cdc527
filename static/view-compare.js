/* The compare view (#/compare?a=<id>&b=<id>): two runs' training loss overlaid (against step or
 * summed step time), their median throughput side by side with the ratio, and a table of their
 * figures. With no or a bad choice in the URL it picks the same model in another precision. */
import { $, h } from "./dom.js";
import { api } from "./api.js";
import { fmt } from "./format.js";
import { Chart } from "./chart.js";
import * as store from "./store.js";
import { precisionOf } from "./job-status.js";
import { chartButtons } from "./downloads.js";

let shown = null; // {A, B, label} of the drawn comparison

const median = (xs) => {
  const v = xs.filter((x) => x !== null && x !== undefined && isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return null;
  const m = v.length >> 1;
  return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
};

export async function enter(r) {
  const params = r.params;
  let list;
  try {
    list = (await api("/api/jobs?limit=200")).jobs.filter((j) => (j.progress || {}).step > 0);
  } catch (e) {
    $("compare-out").replaceChildren(h("p", { class: "alert error", text: `Could not load jobs: ${e.message}` }));
    return;
  }
  for (const j of list) store.remember(j);
  const a = $("cmp-a"), b = $("cmp-b");
  const opts = () => list.map((j) => h("option", { value: j.id, text: `#${j.id} ${j.name} · ${precisionOf(j)} · ${j.status}` }));
  a.replaceChildren(...opts());
  b.replaceChildren(...opts());
  if (list.length < 2) {
    $("compare-out").replaceChildren(h("p", { class: "empty", text: "Comparing needs two jobs that have taken steps. Train the same preset twice with different precisions." }));
    return;
  }
  let ia = Number(params.get("a")), ib = Number(params.get("b"));
  const has = (id) => list.some((j) => j.id === id);
  if (!has(ia)) ia = list[1].id;
  if (!has(ib) || ib === ia) {
    // Prefer the same preset in another precision.
    const ja = list.find((j) => j.id === ia);
    const twin = list.find((j) => j.id !== ia && precisionOf(j) !== precisionOf(ja) && j.spec.model.d_model === ja.spec.model.d_model);
    ib = (twin || list.find((j) => j.id !== ia)).id;
  }
  a.value = ia;
  b.value = ib;
  await render();
}

async function render() {
  const ia = Number($("cmp-a").value), ib = Number($("cmp-b").value);
  const want = `#/compare?a=${ia}&b=${ib}`;
  if (location.hash !== want) history.replaceState(null, "", want);
  const out = $("compare-out");
  if (ia === ib) {
    out.replaceChildren(h("p", { class: "alert info", text: "Pick two different jobs." }));
    return;
  }
  let ra, rb, ja, jb;
  try {
    [ja, jb, ra, rb] = await Promise.all([api(`/api/jobs/${ia}`), api(`/api/jobs/${ib}`), api(`/api/jobs/${ia}/metrics?points=400`), api(`/api/jobs/${ib}/metrics?points=400`)]);
  } catch (e) {
    out.replaceChildren(h("p", { class: "alert error", text: `Could not load the runs: ${e.message}` }));
    return;
  }
  const runs = [[ja, ra.points], [jb, rb.points]].map(([j, pts]) => {
    const steady = pts.length > 3 ? pts.slice(1) : pts; // the first step includes warm-up
    return {
      job: j, pts,
      tps: median(steady.map((p) => p.tokens_per_s)),
      ms: median(steady.map((p) => p.step_ms)),
      final: pts.length ? pts[pts.length - 1].loss : null,
    };
  });
  const [A, B] = runs;
  const label = (r) => `#${r.job.id} ${r.job.name} (${precisionOf(r.job)})`;
  const chartHost = h("div", { class: "chart", id: "chart-compare" });
  const maxTps = Math.max(A.tps || 0, B.tps || 0) || 1;
  const ratio = A.tps && B.tps ? B.tps / A.tps : null;
  const runCard = (r, cls) => h("div", { class: "run " + cls },
    h("div", { class: "muted small", text: label(r) }),
    h("div", { class: "big", text: `${fmt.int(r.tps)} tok/s` }),
    h("div", { class: "hbar", role: "img", "aria-label": `${fmt.int(r.tps)} tokens per second` }, h("span", { style: `width:${(100 * (r.tps || 0)) / maxTps}%` })),
    h("div", { class: "small tnum", text: `${r.ms ? (1000 / r.ms).toFixed(2) : "?"} it/s · ${r.ms ? r.ms.toFixed(0) : "?"} ms/step (median) on ${r.job.device || "?"}` }));
  const sameBatches = JSON.stringify(A.job.spec.data) === JSON.stringify(B.job.spec.data) && A.job.spec.train.batch_size === B.job.spec.train.batch_size && A.job.spec.train.seed === B.job.spec.train.seed;
  const rows = [
    ["Precision", precisionOf(A.job), precisionOf(B.job)],
    ["Device", A.job.device || "–", B.job.device || "–"],
    ["Status", A.job.status, B.job.status],
    ["Steps", fmt.int(A.job.progress.step), fmt.int(B.job.progress.step)],
    ["Final loss", fmt.num(A.final), fmt.num(B.final)],
    ["Best BLEU", fmt.num(A.job.metrics.best_bleu, 2), fmt.num(B.job.metrics.best_bleu, 2)],
    ["Skipped steps", fmt.int(A.job.metrics.skipped_steps), fmt.int(B.job.metrics.skipped_steps)],
    ["Median tokens/s", fmt.int(A.tps), fmt.int(B.tps)],
    ["Median step time", A.ms ? `${A.ms.toFixed(1)} ms` : "–", B.ms ? `${B.ms.toFixed(1)} ms` : "–"],
  ];
  out.replaceChildren(
    h("figure", { class: "card chart-card" }, h("figcaption", null, h("span", { id: "cmp-caption", text: "Training loss, overlaid" }),
      h("span", { class: "dl", role: "group", "aria-label": "Download the comparison" },
        ...chartButtons("chart-compare", "compare", "Training loss", () => null, () => `Training loss · A ${label(A)} vs B ${label(B)}`, `compare-${ia}-${ib}`))), chartHost),
    h("section", { class: "card", "aria-labelledby": "h-tput" },
      h("div", { class: "card-head" }, h("h2", { id: "h-tput", text: "Throughput" })),
      h("div", { class: "tput" }, runCard(A, "a"), runCard(B, "b"),
        h("div", { class: "ratio", id: "cmp-ratio" },
          h("div", { class: "big", text: ratio ? `${ratio.toFixed(2)}×` : "–" }),
          h("div", { class: "small", text: ratio ? `B (${precisionOf(B.job)}) vs A (${precisionOf(A.job)}) tokens/s` : "needs steps in both runs" }))),
      h("p", { class: "muted small", text: sameBatches
        ? "Same data, batch size and seed: both runs see the same batches, so tokens/s compare directly."
        : "The runs differ in data, batch size or seed: compare tokens/s with care." })),
    h("div", { class: "table-wrap" }, h("table", { class: "cmp-table" },
      h("thead", null, h("tr", null, h("th", { scope: "col", text: "" }), h("th", { scope: "col", text: "A: " + label(A) }), h("th", { scope: "col", text: "B: " + label(B) }))),
      h("tbody", null, rows.map(([k, x, y]) => h("tr", null, h("th", { scope: "row", text: k }), h("td", { class: "tnum", text: x }), h("td", { class: "tnum", text: y })))))));
  shown = { A, B, label };
  drawChart();
}

/** Seconds into each point's run: the running sum of step_ms (a downsampled point stands for
 * `bucket` steps, each counted at its last step's time). Validation and checkpoint pauses are not in it. */
function withElapsed(pts) {
  let ms = 0;
  return pts.map((p) => {
    ms += (p.step_ms > 0 ? p.step_ms : 0) * (p.bucket || 1);
    return { ...p, elapsed_s: ms / 1000 };
  });
}

function drawChart() {
  const c = shown, host = $("chart-compare");
  if (!c || !host) return;
  const time = (document.querySelector('input[name="cmp-x"]:checked') || {}).value === "time";
  const { A, B, label } = c;
  const pts = (r) => (time ? withElapsed(r.pts).map((p) => ({ x: p.elapsed_s, y: p.loss })) : r.pts.map((p) => ({ x: p.step, y: p.loss })));
  $("cmp-caption").textContent = time ? "Training loss, overlaid, against time" : "Training loss, overlaid";
  Chart.line(host, {
    label: `Training loss of both runs by ${time ? "time in seconds" : "step"}`,
    xLabel: time ? "time (s)" : "step", yLabel: "loss", height: 280,
    xInteger: !time,
    xFormat: time ? (v) => Chart.compact(v) + " s" : undefined,
    series: [
      { name: "A " + label(A), points: pts(A) },
      { name: "B " + label(B), points: pts(B) },
    ],
  });
}

export function init() {
  $("cmp-a").addEventListener("change", render);
  $("cmp-b").addEventListener("change", render);
  for (const r of document.querySelectorAll('input[name="cmp-x"]')) r.addEventListener("change", drawChart);
  $("compare-form").addEventListener("submit", (e) => e.preventDefault());
}
