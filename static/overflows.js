/* The job page's Overflows panel, drawn from GET /api/jobs/{id}/overflows: automatic
 * recoveries (rollback or the switch to bf16), which gradient tensors and layers overflowed, how
 * often and at which loss scales, the first activation beyond f16, and f16 underflow. */
import { h } from "./dom.js";
import { fmt } from "./format.js";

const OVERFLOW_ROWS = 10;

/** "2¹⁶ ×3, 2¹⁵ ×1", or the range when there are many scales. */
function scalesText(scales) {
  if (scales.length <= 3) return scales.map((s) => `${fmt.scale(s.loss_scale)} ×${s.steps}`).join(", ");
  const n = scales.reduce((a, s) => a + s.steps, 0);
  return `${fmt.scale(scales[0].loss_scale)} … ${fmt.scale(scales[scales.length - 1].loss_scale)} (${scales.length} scales, ${n} steps)`;
}

/** The panel's contents for job `id` from its overflow report `r`. */
export function overflowPanel(id, r) {
  const parts = [];
  if (r.recoveries && r.recoveries.length) {
    parts.push(h("ul", { class: "recoveries", id: "recoveries" }, r.recoveries.map((x) =>
      h("li", { class: "alert", text: x.action === "bf16"
        ? `Step ${x.step}: the loss scale collapsed; switched to bf16 from the checkpoint at step ${x.resumed_from_step}.`
        : `Step ${x.step}: the loss scale collapsed; rolled back to the checkpoint at step ${x.resumed_from_step} with lr ${Number(x.lr).toPrecision(3)} (${x.precision}).` }))));
  }
  const u = r.underflow.length ? r.underflow[r.underflow.length - 1] : null;
  const pct = (x) => (100 * x).toFixed(x < 0.01 ? 3 : 1) + "%";
  if (!r.overflow_steps) {
    parts.push(h("p", { class: "muted", id: "overflow-summary", text: "No overflowing steps." }));
  } else {
    parts.push(h("p", { id: "overflow-summary", text: `${fmt.int(r.overflow_steps)} overflowing steps; ${r.tensors.length} gradient tensors held inf/NaN in ${r.layers.length} layers.` }));
    parts.push(h("div", { class: "table-wrap" }, h("table", { class: "overflows", id: "overflow-tensors" },
      h("thead", null, h("tr", null, ["Tensor", "Layer", "Steps", "Inf/NaN values", "At scales", "Largest finite", "Last step"].map((t, i) => h("th", { scope: "col", class: i >= 2 && i !== 4 ? "num" : null, text: t })))),
      h("tbody", null, r.tensors.slice(0, OVERFLOW_ROWS).map((t) => h("tr", null,
        h("td", { text: t.tensor }),
        h("td", { text: t.layer }),
        h("td", { class: "num", text: fmt.int(t.steps) }),
        h("td", { class: "num", text: fmt.int(t.non_finite_values) }),
        h("td", { text: scalesText(t.scales) }),
        h("td", { class: "num", text: t.max_finite === null ? "–" : Number(t.max_finite).toPrecision(3) }),
        h("td", { class: "num", text: fmt.int(t.last_step) })))))));
    if (r.tensors.length > OVERFLOW_ROWS) parts.push(h("p", { class: "muted", id: "overflow-more", text: `…and ${r.tensors.length - OVERFLOW_ROWS} more tensors (GET /api/jobs/${id}/overflows lists all).` }));
    if (r.activations.length) {
      parts.push(h("p", { id: "overflow-activations", text: "First activation beyond f16: " + r.activations.map((a) => `${a.activation} (${a.steps} steps)`).join(", ") }));
    }
    parts.push(h("ul", { class: "overflow-recent", id: "overflow-recent" }, r.recent.map((e) =>
      h("li", { text: `step ${e.step} at scale ${fmt.scale(e.loss_scale)}: ${e.tensors.map((t) => t.tensor).join(", ") || (e.loss_finite ? "–" : "loss not finite")}` }))));
  }
  if (u) parts.push(h("p", { class: "muted", id: "overflow-underflow", text: `f16 underflow at step ${u.step} (scale ${fmt.scale(u.loss_scale)}): ${pct(u.underflow_share)} of gradient values below f16's smallest subnormal, ${pct(u.zero_share)} zero.` }));
  return parts;
}
