/* The page's standing with the server: the API token (kept for this tab in session storage),
 * whether reads need it (then EventSource, which cannot send it, is not used), and whether the
 * server answers at all. This module alone changes those facts; the live-events module listens
 * with `onChange` to redraw the connection indicator and drop its streams. */
import { $ } from "./dom.js";

const TOKEN_KEY = "ampserve.token";

const s = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  tokenDeclined: false,
  readsProtected: false,
  offline: false,
};
const listeners = [];
const changed = () => { for (const f of listeners) f(); };

export const token = () => s.token;
export const tokenDeclined = () => s.tokenDeclined;
export const readsProtected = () => s.readsProtected;
export const offline = () => s.offline;
export function onChange(fn) { listeners.push(fn); }

/** The last request could not reach the server (`true`) or did (`false`). */
export function setOffline(v) {
  if (v) { s.offline = true; changed(); }
  else if (s.offline) { s.offline = false; changed(); }
}

/** The server wants a token: show the header's button; a refused read means every read needs it. */
export function tokenRequired(forRead) {
  $("token-btn").hidden = false;
  if (forRead && !s.readsProtected) { s.readsProtected = true; changed(); }
}

/** Reads need the token (found out by a probe without it). */
export function protectReads() {
  s.readsProtected = true;
  changed();
}

let tokenPrompt = null;
/** Ask for the token in the dialog; resolves true once one is given (and kept for the tab). */
export function askToken(error) {
  if (tokenPrompt) return tokenPrompt;
  const dlg = $("token-dialog");
  $("token-error").textContent = error || "";
  $("token-input").value = "";
  tokenPrompt = new Promise((resolve) => {
    const done = () => {
      dlg.removeEventListener("close", done);
      tokenPrompt = null;
      const v = $("token-input").value.trim();
      if (dlg.returnValue === "ok" && v) {
        s.token = v;
        s.tokenDeclined = false;
        sessionStorage.setItem(TOKEN_KEY, v);
        resolve(true);
      } else {
        // Do not ask again on every poll; the header's "API token" button asks again.
        s.tokenDeclined = true;
        resolve(false);
      }
    };
    dlg.addEventListener("close", done);
    dlg.returnValue = "";
    dlg.showModal();
    $("token-input").focus();
  });
  return tokenPrompt;
}

/** The header's "API token" button: ask again even after the user declined once. */
export function askAgain() {
  s.tokenDeclined = false;
  return askToken("");
}
