/* The Experiments view (#/experiments, #/experiments/<id>): one precision experiment's arms,
 * their training loss against step and against summed step time (one curve per arm), and the
 * summary table with every arm's verdict, from GET /api/experiments[/{id}] and each arm job's
 * downsampled metrics. router.js calls `enter` with the route. */
import { $, h } from "./dom.js";
import { api } from "./api.js";
import { fmt } from "./format.js";
import { Chart } from "./chart.js";

let current = null; // {id, x, metrics, lastFetch}

const mem = (a) => {
  if (a.peak_memory_bytes === null || a.peak_memory_bytes === undefined) return "–";
  const mib = a.peak_memory_bytes / 2 ** 20;
  const v = mib >= 1024 ? `${(mib / 1024).toFixed(1)} GiB` : `${mib.toFixed(0)} MiB`;
  return a.peak_memory_source === "estimated" ? `≈${v} (est.)` : v;
};

/** Seconds of summed step time at each point (a downsampled point stands for `bucket` steps). */
function elapsed(pts) {
  let ms = 0;
  return pts.map((p) => {
    ms += (p.step_ms > 0 ? p.step_ms : 0) * (p.bucket || 1);
    return { x: ms / 1000, y: p.loss };
  });
}

export async function enter(r) {
  const id = r.parts[1] ? Number(r.parts[1]) : null;
  let list;
  try {
    list = (await api("/api/experiments?limit=100")).experiments;
  } catch (e) {
    $("exp-out").replaceChildren(h("p", { class: "alert error", text: `Could not load experiments: ${e.message}` }));
    return;
  }
  const sel = $("exp-pick");
  sel.replaceChildren(...list.map((x) => h("option", { value: x.id, text: `#${x.id} ${x.name} · ${x.arms.map((a) => a.label).join(" vs ")} · ${x.status}` })));
  if (!list.length) {
    current = null;
    $("exp-out").replaceChildren(h("p", { class: "empty", id: "exp-empty", text: "No experiments yet. POST /api/experiments with a spec, \"arms\" and a budget (see docs/API.md), or run `ampserve experiment` locally." }));
    return;
  }
  const pick = list.find((x) => x.id === id) || list[0];
  sel.value = pick.id;
  await show(pick.id);
}

async function show(id) {
  const want = `#/experiments/${id}`;
  if (location.hash !== want) history.replaceState(null, "", want);
  let x, metrics;
  try {
    x = await api(`/api/experiments/${id}`);
    metrics = await Promise.all(x.arms.map((a) => (a.job_id ? api(`/api/jobs/${a.job_id}/metrics?points=400`).then((r) => r.points, () => []) : Promise.resolve([]))));
  } catch (e) {
    $("exp-out").replaceChildren(h("p", { class: "alert error", text: `Could not load experiment ${id}: ${e.message}` }));
    return;
  }
  current = { id, x, metrics, lastFetch: Date.now() };
  render();
}

function render() {
  const { x, metrics } = current;
  const budget = [x.max_steps ? `${fmt.int(x.max_steps)} steps` : null, x.max_time_s ? `${x.max_time_s} s` : null].filter(Boolean).join(" or ");
  const heads = ["Arm", "Job", "Status", "Steps", "Tokens/s", "Speedup",
    `Loss @ step ${x.equal_step ?? "–"}`, `Loss @ ${x.equal_time_s !== null && x.equal_time_s !== undefined ? x.equal_time_s.toFixed(1) + " s" : "–"}`,
    "Val loss", "BLEU", "chrF", "Skipped", "Peak memory"];
  const rows = x.arms.map((a) => [
    a.label,
    a.job_id ? h("a", { href: `#/jobs/${a.job_id}`, text: `#${a.job_id}` }) : "–",
    a.status, fmt.int(a.steps), fmt.int(a.tokens_per_s),
    a.speedup ? `${a.speedup.toFixed(2)}×` : "–",
    fmt.num(a.loss_at_equal_steps), fmt.num(a.loss_at_equal_time),
    fmt.num(a.val_loss), fmt.num(a.bleu, 2), fmt.num(a.chrf, 1), fmt.int(a.skipped_steps), mem(a),
  ]);
  $("exp-out").replaceChildren(
    h("p", { class: "muted", id: "exp-status", text: `${x.status} · every arm: budget ${budget || "–"}, same seed, data order and initial weights · the first arm is the baseline` }),
    h("div", { class: "charts" },
      h("figure", { class: "card chart-card" }, h("figcaption", { text: "Training loss by step" }), h("div", { class: "chart", id: "chart-exp-step" })),
      h("figure", { class: "card chart-card" }, h("figcaption", { text: "Training loss by summed step time (s)" }), h("div", { class: "chart", id: "chart-exp-time" }))),
    h("div", { class: "table-wrap" }, h("table", { class: "cmp-table", id: "exp-table" },
      h("caption", { class: "sr-only", text: "Per-arm figures" }),
      h("thead", null, h("tr", null, heads.map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", null, rows.map((r) => h("tr", null, r.map((c, i) => (i === 0 ? h("th", { scope: "row", text: c }) : h("td", { class: "tnum" }, c)))))))),
    h("ul", { class: "verdicts", id: "exp-verdicts" }, x.arms.map((a) => h("li", { text: a.verdict }))),
    h("p", { class: "muted small", text: `Loss @ step / @ time: mean training loss over the ${x.window} steps up to the last step (or summed step time) every arm reached. Tokens/s over summed step time; speedup over the first arm. “Within noise”: |ΔBLEU| ≤ ${x.noise_bleu}, a stated threshold, not a significance test. Peak memory marked est. is the admission estimate.` }));
  const series = (f) => x.arms.map((a, i) => ({ name: a.label, points: f(metrics[i] || []) }));
  Chart.line($("chart-exp-step"), {
    label: "Training loss of every arm by step", xLabel: "step", yLabel: "loss", height: 260, xInteger: true,
    series: series((pts) => pts.map((p) => ({ x: p.step, y: p.loss }))),
  });
  Chart.line($("chart-exp-time"), {
    label: "Training loss of every arm by summed step time in seconds", xLabel: "time (s)", yLabel: "loss", height: 260,
    xFormat: (v) => Chart.compact(v) + " s",
    series: series(elapsed),
  });
}

/** Called once a second while the view is open: refresh an unfinished experiment. */
export function tick() {
  if (current && current.x.status !== "finished" && Date.now() - current.lastFetch > 3000) {
    current.lastFetch = Date.now();
    show(current.id);
  }
}

export function init() {
  $("exp-pick").addEventListener("change", () => show(Number($("exp-pick").value)));
}
