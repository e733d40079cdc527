/* Form errors the same way on every form: an API error goes next to the field it names (its
 * `err-<field>` slot, with aria-invalid and focus on the input), else into the form's alert. */
import { $ } from "./dom.js";

export function clearFormErrors(form) {
  form.querySelectorAll(".field-error").forEach((e) => (e.textContent = ""));
  form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  const fe = form.querySelector(".alert.error");
  if (fe) { fe.hidden = true; fe.textContent = ""; }
}

/** Show an API error next to the field it names, else at the top of the form. */
export function showFieldError(form, field, message, fallbackId) {
  const slot = field && document.getElementById("err-" + field);
  if (slot && form.contains(slot)) {
    slot.textContent = message;
    const input = form.querySelector(`[aria-describedby~="err-${CSS.escape(field)}"]`);
    if (input) { input.setAttribute("aria-invalid", "true"); input.focus(); }
    return;
  }
  const fe = $(fallbackId);
  fe.textContent = field ? `${field}: ${message}` : message;
  fe.hidden = false;
}
