/* The one way the page talks to the JSON API: `api(path, {method, body})` adds the token, turns
 * every failure into an `ApiError` (status, code, message and the field the server named), asks
 * for the token on a 401 and retries, and tells session.js whether the server is reachable. */
import * as session from "./session.js";

export class ApiError extends Error {
  constructor(status, code, message, field, retryAfter) {
    super(message);
    this.status = status;
    this.code = code;
    this.field = field || null;
    this.retryAfter = retryAfter || null;
  }
}

const STATUS_TEXT = {
  400: "The request was not understood.",
  401: "This needs the API token.",
  404: "Not found.",
  408: "The server took too long to answer.",
  409: "That is not possible in the job's current state.",
  413: "That is too large.",
  422: "A value was not accepted.",
  429: "The server is busy; try again shortly.",
  500: "The server hit an internal error (see its log).",
  503: "The server is not ready.",
};

/** `opts`: method, body (sent as JSON), anonymous (no token), noAuthRetry (no dialog on 401). */
export async function api(path, opts = {}) {
  const method = opts.method || "GET";
  const headers = { accept: "application/json" };
  if (opts.body !== undefined) headers["content-type"] = "application/json";
  if (session.token() && !opts.anonymous) headers.authorization = "Bearer " + session.token();
  let resp;
  try {
    resp = await fetch(path, { method, headers, body: opts.body === undefined ? undefined : JSON.stringify(opts.body) });
  } catch (_) {
    session.setOffline(true);
    throw new ApiError(0, "network", "Cannot reach the server. Is ampserve still running?");
  }
  session.setOffline(false);
  const text = await resp.text();
  let data = null;
  if (text) {
    try { data = JSON.parse(text); } catch (_) { data = undefined; }
  }
  if (resp.status === 401 && !opts.noAuthRetry && !session.tokenDeclined()) {
    session.tokenRequired(method === "GET");
    const given = await session.askToken(session.token() ? "The token was not accepted. Check it and try again." : "");
    if (given) return api(path, opts);
  }
  if (!resp.ok) {
    const e = data && data.error;
    throw new ApiError(
      resp.status,
      (e && e.code) || "http_" + resp.status,
      (e && typeof e.message === "string" && e.message) || STATUS_TEXT[resp.status] || `The server answered ${resp.status}.`,
      e && e.field,
      resp.headers.get("retry-after"),
    );
  }
  if (data === undefined) throw new ApiError(resp.status, "bad_response", "The server sent a response the page cannot read.");
  return data;
}

/** With a stored token, find out once whether reads need it (EventSource cannot send it). */
export async function probeReads() {
  if (!session.token()) return;
  try {
    await api("/api/jobs?limit=1", { anonymous: true, noAuthRetry: true });
  } catch (e) {
    if (e.status === 401) session.protectReads();
  }
}
