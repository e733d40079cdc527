/* The translate view (#/translate): pick an exported model from GET /api/models (with its
 * kind (our Transformer or an imported Marian model), languages, dtype and newest score), type a sentence, POST /api/translate, and show the
 * translation with the server's timing; errors go next to the field the API names. */
import { $, h } from "./dom.js";
import { api } from "./api.js";
import { fmt } from "./format.js";
import { clearFormErrors, showFieldError } from "./forms.js";

/** GET /api/models' `kind`: a Transformer trained by this server, or an imported MarianMT model. */
const KINDS = { ampserve: "Transformer (trained here)", marian: "MarianMT (imported)" };
const kindText = (m) => KINDS[m.kind] || m.kind || "unknown kind";

export async function enter() {
  const none = $("tr-none"), sel = $("tr-model");
  let models;
  try {
    models = (await api("/api/models")).models || [];
  } catch (e) {
    if (e.status === 404) models = [];
    else {
      none.textContent = `Could not load the models: ${e.message}`;
      none.hidden = false;
      return;
    }
  }
  const cur = sel.value;
  // the newest test-set score (POST /api/models/{id}/evaluate), else the validation BLEU
  const score = (m) => {
    const ev = (m.evaluations || []).at(-1);
    if (ev) return ` · test BLEU ${fmt.num(ev.bleu, 2)} chrF ${fmt.num(ev.chrf, 2)} (${ev.corpus.split("/").pop()})`;
    return m.val_bleu !== null && m.val_bleu !== undefined ? ` · valid BLEU ${fmt.num(m.val_bleu, 2)}` : "";
  };
  sel.replaceChildren(...models.map((m) => h("option", { value: m.id, dataset: { kind: m.kind }, text: `#${m.id} ${m.name} · ${kindText(m)} · ${m.src_lang}→${m.tgt_lang} · ${m.dtype}${score(m)}` })));
  if (cur && models.some((m) => String(m.id) === cur)) sel.value = cur;
  const empty = models.length === 0;
  none.hidden = !empty;
  none.textContent = empty ? "No models yet. A job that succeeds is exported automatically; a stopped one can be exported with its Export button." : "";
  for (const id of ["tr-model", "tr-beam", "tr-text", "tr-submit"]) $(id).disabled = empty;
}

async function submit(ev) {
  ev.preventDefault();
  const form = $("tr-form");
  clearFormErrors(form);
  const text = $("tr-text").value.trim();
  if (!text) { showFieldError(form, "text", "Type a sentence to translate.", "tr-error"); return; }
  const body = { model: Number($("tr-model").value), text, beam_size: Number($("tr-beam").value) };
  $("tr-submit").disabled = true;
  $("tr-status").textContent = "Translating…";
  const t0 = performance.now();
  try {
    const r = await api("/api/translate", { method: "POST", body });
    const rt = performance.now() - t0;
    const tr = r.translations[0];
    $("tr-result").textContent = tr.text || "(empty translation)";
    const t = r.timing || {};
    $("tr-timing").textContent = `${fmt.num(t.total_ms, 1)} ms on the server (decode ${fmt.num(t.decode_ms, 1)} ms, queue ${fmt.num(t.queue_ms, 1)} ms, batch of ${t.batch_size ?? "?"}) · ${Math.round(rt)} ms round trip · ${r.beam_size === 1 ? "greedy" : "beam " + r.beam_size} · ${tr.source_tokens} → ${tr.tokens} tokens`;
    $("tr-out").hidden = false;
  } catch (e) {
    if (e.status === 429) showFieldError(form, null, `The model is busy; try again${e.retryAfter ? ` in ${e.retryAfter} s` : " shortly"}.`, "tr-error");
    else if (e.status === 404 && !e.field) showFieldError(form, "model", e.message, "tr-error");
    else showFieldError(form, e.field, e.message, "tr-error");
  } finally {
    $("tr-status").textContent = "";
    $("tr-submit").disabled = false;
  }
}

export function init() {
  $("tr-form").addEventListener("submit", submit);
}
