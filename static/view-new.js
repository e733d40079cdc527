/* The new-job view (#/new): pick a preset from GET /api/configs (the form starts from its
 * values), override name, precision, epochs, batch size and max steps, and POST /api/jobs; the
 * API's validation error shows next to the field it names. */
import { $, h, toast } from "./dom.js";
import { api } from "./api.js";
import * as store from "./store.js";
import { clearFormErrors, showFieldError } from "./forms.js";

const FORM_FIELDS = [
  ["f-precision", "train.precision", "string"],
  ["f-epochs", "train.epochs", "int"],
  ["f-batch", "train.batch_size", "int"],
  ["f-steps", "train.max_steps", "int"],
];

let configs = null; // GET /api/configs, loaded once

export async function enter() {
  const sel = $("f-config");
  if (!configs) {
    try {
      configs = (await api("/api/configs")).configs;
    } catch (e) {
      showFieldError($("new-form"), null, `Could not load the presets: ${e.message}`, "form-error");
      return;
    }
    sel.replaceChildren(...configs.map((c) => h("option", { value: c.name, disabled: !c.spec, text: c.spec ? c.name : `${c.name} (unavailable)` })));
    const first = configs.find((c) => c.name === "tiny" && c.spec) || configs.find((c) => c.spec);
    if (first) sel.value = first.name;
    fillFromPreset();
  }
}

function fillFromPreset() {
  const c = (configs || []).find((x) => x.name === $("f-config").value);
  if (!c || !c.spec) { $("d-config").textContent = c && c.error ? c.error.message : ""; return; }
  const s = c.spec;
  $("f-precision").value = s.train.precision;
  $("f-epochs").value = s.train.epochs;
  $("f-batch").value = s.train.batch_size;
  $("f-steps").value = s.train.max_steps;
  $("f-name").placeholder = s.name;
  const file = String(s.data.train).split("/").slice(-2).join("/");
  $("d-config").textContent = `d_model ${s.model.d_model} · ${s.model.layers}+${s.model.layers} layers · ${s.model.heads} heads · d_ff ${s.model.d_ff} · ${file} (${s.data.src_lang}→${s.data.tgt_lang})`;
}

async function submit(ev) {
  ev.preventDefault();
  const form = $("new-form");
  clearFormErrors(form);
  const body = { config: $("f-config").value, train: {} };
  const name = $("f-name").value.trim();
  if (name) body.name = name;
  let bad = false;
  for (const [id, field, kind] of FORM_FIELDS) {
    const input = $(id);
    if (kind === "int") {
      if (input.validity && input.validity.badInput) {
        showFieldError(form, field, "Enter a whole number.", "form-error");
        bad = true;
        continue;
      }
      if (input.value.trim() === "") continue; // keep the preset's value
      body.train[field.split(".")[1]] = Number(input.value);
    } else {
      body.train[field.split(".")[1]] = input.value;
    }
  }
  if (bad) return;
  const btn = $("f-submit");
  btn.disabled = true;
  $("f-status").textContent = "Submitting…";
  try {
    const job = await api("/api/jobs", { method: "POST", body });
    $("f-status").textContent = "";
    store.merge(job);
    toast(`Job ${job.id} (${job.name}) queued`);
    // Next time the form starts from the preset again.
    $("f-name").value = "";
    fillFromPreset();
    location.hash = `#/jobs/${job.id}`;
  } catch (e) {
    $("f-status").textContent = "";
    showFieldError(form, e.field, e.message, "form-error");
  } finally {
    btn.disabled = false;
  }
}

export function init() {
  $("f-config").addEventListener("change", () => { clearFormErrors($("new-form")); fillFromPreset(); });
  $("new-form").addEventListener("submit", submit);
}
