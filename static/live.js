/* Live updates: one EventSource per job worth following (the open job, then running jobs on
 * screen, then queued ones; at most MAX_STREAMS), handing status / step events to the store as
 * they arrive, and giving up on a stream after repeated errors so the views' polling takes
 * over. It also owns the header's connection indicator. What is on screen comes from the function
 * given to `start`; events for the open job go to the listeners registered with `onEvent`. */
import { $, debounce } from "./dom.js";
import { api } from "./api.js";
import * as session from "./session.js";
import * as store from "./store.js";
import { ACTIVE, STREAMING, TERMINAL } from "./store.js";

const MAX_STREAMS = 4; // browsers allow ~6 HTTP/1.1 connections per host

const streams = new Map(); // id -> {es, errors}
const listeners = [];
let screen = () => ({ detail: null, list: [] });

/** Whether job `id` is followed over SSE now. */
export const streaming = (id) => streams.has(id);

/** `fn(id, type, data)` for every validation / checkpoint / overflow / recovery / step event. */
export function onEvent(fn) { listeners.push(fn); }
const emit = (id, type, data) => { for (const f of listeners) f(id, type, data); };

/** `onScreen()` -> {detail: the open job's id or null, list: ids shown in the jobs table}. */
export function start(onScreen) {
  screen = onScreen;
  store.on("merged", syncStreams);
  store.on("deleted", closeStream);
  session.onChange(() => {
    if (session.readsProtected()) closeAllStreams();
    setConn(connMode());
  });
}

export function setConn(mode) {
  const c = $("conn");
  const text = {
    live: "live updates",
    polling: "updating every 2 s",
    offline: "server unreachable — retrying",
    idle: "connected",
  }[mode];
  if (c.dataset.state === mode) return;
  c.dataset.state = mode;
  c.querySelector(".conn-text").textContent = text;
}

function connMode() {
  if (session.offline()) return "offline";
  if (session.readsProtected() || typeof EventSource !== "function") return "polling";
  if (streams.size) return "live";
  // A running job on screen without a stream (it failed): the views' tick polls it.
  const s = screen();
  const shown = s.detail !== null ? [s.detail] : s.list;
  return shown.some((id) => STREAMING.has((store.job(id) || {}).status)) ? "polling" : "idle";
}

function closeStream(id) {
  const s = streams.get(id);
  if (s) { s.es.close(); streams.delete(id); }
}

function closeAllStreams() {
  for (const id of Array.from(streams.keys())) closeStream(id);
}

/** Which jobs get an EventSource: the open detail job, then running jobs on screen, then
 * queued ones (so the switch to running and the `started` event arrive as they happen). */
export function syncStreams() {
  if (session.readsProtected() || typeof EventSource !== "function") { setConn(connMode()); return; }
  const s = screen();
  const want = [];
  if (s.detail !== null) {
    const j = store.job(s.detail);
    if (j && ACTIVE.has(j.status)) want.push(j.id);
  }
  for (const pass of [STREAMING, new Set(["queued"])]) {
    for (const id of s.list) {
      const j = store.job(id);
      if (j && pass.has(j.status) && !want.includes(id)) want.push(id);
    }
  }
  const keep = new Set(want.slice(0, MAX_STREAMS));
  for (const id of Array.from(streams.keys())) if (!keep.has(id)) closeStream(id);
  for (const id of keep) if (!streams.has(id)) openStream(id);
  setConn(connMode());
}

function openStream(id) {
  const es = new EventSource(`/api/jobs/${id}/events`);
  const entry = { es, errors: 0 };
  streams.set(id, entry);
  const parse = (ev) => { try { return JSON.parse(ev.data); } catch (_) { return null; } };
  es.addEventListener("open", () => { entry.errors = 0; });
  es.addEventListener("status", (ev) => {
    const d = parse(ev);
    if (!d) return;
    store.applyStatus(id, d);
    // Fetch started_at and the other fields a status event does not carry.
    if (d.status === "running") debounce("one-" + id, () => refreshOne(id), 300);
    if (TERMINAL.has(d.status)) {
      // The server ends the stream here; stop EventSource from reconnecting.
      closeStream(id);
      setConn(connMode());
      refreshOne(id);
    }
  });
  es.addEventListener("started", (ev) => {
    const d = parse(ev);
    if (d && store.applyStarted(id, d)) store.touch(id);
  });
  es.addEventListener("step", (ev) => {
    const d = parse(ev);
    if (!d || !store.applyStep(id, d)) return;
    emit(id, "step", d);
    store.touch(id);
  });
  for (const type of ["validation", "checkpoint", "overflow", "recovery"]) es.addEventListener(type, () => emit(id, type, null));
  es.addEventListener("lagged", () => refreshOne(id));
  es.onerror = () => {
    entry.errors++;
    if (es.readyState === EventSource.CLOSED || entry.errors >= 3) {
      // Fall back to polling for this job (the views' tick refreshes it).
      closeStream(id);
      setConn(connMode());
    }
  };
}

/** Refetch one job (a status event carries only the status). */
async function refreshOne(id) {
  try {
    const job = await api(`/api/jobs/${id}`);
    store.merge(job);
    store.touch(id);
  } catch (e) {
    if (e.status === 404) store.removed(id);
  }
}
