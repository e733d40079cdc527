/* DOM helpers every view shares: `$` (by id), `h` (build an element tree), toasts, the confirm
 * dialog and keyed debouncing. No state beyond the toast and timer bookkeeping kept here. */

export const $ = (id) => document.getElementById(id);

/** `h("a", {href, class, text, onclick, dataset}, ...children)`: falsy attributes and children are skipped. */
export function h(tag, attrs, ...children) {
  const e = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else if (k === "dataset") Object.assign(e.dataset, v);
      else e.setAttribute(k, v === true ? "" : v);
    }
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) e.append(c instanceof Node ? c : String(c));
  return e;
}

const recentToasts = new Map(); // message -> time, so polling does not repeat itself
export function toast(message, kind) {
  const now = Date.now();
  if (now - (recentToasts.get(message) || 0) < 30000) return;
  recentToasts.set(message, now);
  const t = h("div", { class: "toast" + (kind ? " " + kind : "") , text: message });
  $("toasts").append(t);
  setTimeout(() => t.remove(), kind === "error" ? 8000 : 5000);
}

/** The page's confirm dialog; resolves true when the user confirms. */
export function confirmDialog(title, text, yes) {
  const dlg = $("confirm-dialog");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  $("confirm-yes").textContent = yes;
  return new Promise((resolve) => {
    const done = () => { dlg.removeEventListener("close", done); resolve(dlg.returnValue === "ok"); };
    dlg.addEventListener("close", done);
    dlg.returnValue = "";
    dlg.showModal();
    $("confirm-no").focus();
  });
}

const timers = {};
/** Run `fn` once `ms` after the last call with the same `key`. */
export function debounce(key, fn, ms) {
  clearTimeout(timers[key]);
  timers[key] = setTimeout(fn, ms);
}
