/* ampserve status page: jobs (live via SSE, polling as a fallback), job detail with charts,
 * run comparison, the new-job form and the translate box. Plain JS, no build step. */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
  const ACTIVE = new Set(["queued", "running", "cancelling"]);
  const STREAMING = new Set(["running", "cancelling"]);
  const SYMBOL = { queued: "◷", running: "▶", cancelling: "…", succeeded: "✓", failed: "✕", cancelled: "■" };
  const TOKEN_KEY = "ampserve.token";
  const MAX_STREAMS = 4; // browsers allow ~6 HTTP/1.1 connections per host

  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    tokenNeeded: false,
    readsProtected: false,
    jobs: new Map(), // id -> job view from the API, patched by SSE events
    order: [], // ids, newest first
    total: 0,
    streams: new Map(), // id -> {es, errors}
    rates: new Map(), // id -> [[ms, step]...] from SSE step events
    view: "",
    detail: null, // {id, metrics, validations, checkpoints, ...}
    configs: null,
    lastJobsFetch: 0,
    offline: false,
  };

  /* ---------------- helpers ---------------- */

  function h(tag, attrs, ...children) {
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

  const fmt = {
    num(v, d = 3) {
      if (v === null || v === undefined || !isFinite(v)) return "–";
      return Number(v).toFixed(d);
    },
    int(v) {
      if (v === null || v === undefined || !isFinite(v)) return "–";
      return Math.round(v).toLocaleString("en-US");
    },
    /** Loss scales: 65,536 up to 7 digits, then powers of two as 2ⁿ. */
    scale(v) {
      if (v === null || v === undefined || !isFinite(v)) return "–";
      const k = Math.log2(v);
      if (v >= 1e7 && Number.isInteger(k)) return "2" + String(k).replace(/\d/g, (d) => "⁰¹²³⁴⁵⁶⁷⁸⁹"[d]);
      if (v >= 1e7) return v.toExponential(2);
      return v >= 1e4 ? Math.round(v).toLocaleString("en-US") : String(Number(v.toPrecision(4)));
    },
    bytes(n) {
      if (!isFinite(n)) return "–";
      const u = ["B", "KiB", "MiB", "GiB"];
      let i = 0;
      while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
      return (i ? n.toFixed(1) : n) + " " + u[i];
    },
    /** tqdm-style durations: 01:02, 1:01:02. */
    dur(s) {
      if (s === null || s === undefined || !isFinite(s) || s < 0) return "?";
      s = Math.round(s);
      const hh = Math.floor(s / 3600), mm = Math.floor((s % 3600) / 60), ss = s % 60;
      const p = (n) => String(n).padStart(2, "0");
      return hh ? `${hh}:${p(mm)}:${p(ss)}` : `${p(mm)}:${p(ss)}`;
    },
    rate(r) {
      if (!r || !isFinite(r) || r <= 0) return "?it/s";
      return r >= 1 ? `${r.toFixed(2)}it/s` : `${(1 / r).toFixed(2)}s/it`;
    },
    time(iso) {
      if (!iso) return "–";
      const d = new Date(iso);
      if (isNaN(d)) return iso;
      return d.toLocaleString(undefined, { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", second: "2-digit" });
    },
  };

  const recentToasts = new Map(); // message -> time, so polling does not repeat itself
  function toast(message, kind) {
    const now = Date.now();
    if (now - (recentToasts.get(message) || 0) < 30000) return;
    recentToasts.set(message, now);
    const t = h("div", { class: "toast" + (kind ? " " + kind : "") , text: message });
    $("toasts").append(t);
    setTimeout(() => t.remove(), kind === "error" ? 8000 : 5000);
  }

  function setConn(mode) {
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
    if (state.offline) return "offline";
    if (state.readsProtected || typeof EventSource !== "function") return "polling";
    if (state.streams.size) return "live";
    // A running job on screen without a stream (it failed): the tick polls it.
    const shown = state.view === "job" && state.detail ? [state.detail.id] : state.view === "jobs" ? state.order : [];
    return shown.some((id) => STREAMING.has((state.jobs.get(id) || {}).status)) ? "polling" : "idle";
  }

  /** With a stored token, find out once whether reads need it (EventSource cannot send it). */
  async function probeReads() {
    if (!state.token) return;
    try {
      await api("/api/jobs?limit=1", { anonymous: true, noAuthRetry: true });
    } catch (e) {
      if (e.status === 401) {
        state.readsProtected = true;
        state.tokenNeeded = true;
        closeAllStreams();
        setConn(connMode());
      }
    }
  }

  /* ---------------- API ---------------- */

  class ApiError extends Error {
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

  async function api(path, opts = {}) {
    const method = opts.method || "GET";
    const headers = { accept: "application/json" };
    if (opts.body !== undefined) headers["content-type"] = "application/json";
    if (state.token && !opts.anonymous) headers.authorization = "Bearer " + state.token;
    let resp;
    try {
      resp = await fetch(path, { method, headers, body: opts.body === undefined ? undefined : JSON.stringify(opts.body) });
    } catch (_) {
      state.offline = true;
      setConn("offline");
      throw new ApiError(0, "network", "Cannot reach the server. Is ampserve still running?");
    }
    if (state.offline) { state.offline = false; setConn(connMode()); }
    const text = await resp.text();
    let data = null;
    if (text) {
      try { data = JSON.parse(text); } catch (_) { data = undefined; }
    }
    if (resp.status === 401 && !opts.noAuthRetry && !state.tokenDeclined) {
      state.tokenNeeded = true;
      $("token-btn").hidden = false;
      if (method === "GET" && !state.readsProtected) {
        state.readsProtected = true;
        closeAllStreams();
        setConn(connMode());
      }
      const given = await askToken(state.token ? "The token was not accepted. Check it and try again." : "");
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

  /* ---------------- token dialog ---------------- */

  let tokenPrompt = null;
  function askToken(error) {
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
          state.token = v;
          state.tokenDeclined = false;
          sessionStorage.setItem(TOKEN_KEY, v);
          resolve(true);
        } else {
          // Do not ask again on every poll; the header's "API token" button asks again.
          state.tokenDeclined = true;
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

  /* ---------------- confirm dialog ---------------- */

  function confirmDialog(title, text, yes) {
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

  /* ---------------- progress (tqdm line) ---------------- */

  function rateOf(job) {
    const samples = state.rates.get(job.id);
    if (samples && samples.length >= 2) {
      const [t0, s0] = samples[0], [t1, s1] = samples[samples.length - 1];
      if (t1 - t0 >= 1000 && s1 > s0) return ((s1 - s0) * 1000) / (t1 - t0);
    }
    return job.metrics && job.metrics.steps_per_s;
  }

  function elapsedOf(job) {
    if (!job.started_at) return null;
    const start = Date.parse(job.started_at);
    const end = job.finished_at && TERMINAL.has(job.status) ? Date.parse(job.finished_at) : Date.now();
    return Math.max(0, (end - start) / 1000);
  }

  /** `step/total [elapsed<eta, rate]` like the CLI's tqdm line. */
  function progressText(job) {
    const p = job.progress || {};
    const step = p.step || 0;
    const total = p.total_steps;
    if (job.status === "queued" && !step) return "waiting for a worker";
    const rate = rateOf(job);
    const elapsed = elapsedOf(job);
    const left = total ? Math.max(0, total - step) : null;
    let eta = "?";
    if (TERMINAL.has(job.status)) eta = "00:00";
    else if (left !== null && rate > 0) eta = fmt.dur(left / rate);
    const pct = total ? ` ${Math.floor((100 * step) / total)}%` : "";
    return `${step}/${total || "?"}${pct} [${fmt.dur(elapsed)}<${eta}, ${fmt.rate(rate)}]`;
  }

  function progressBar(job) {
    const p = job.progress || {};
    const frac = p.fraction !== null && p.fraction !== undefined ? p.fraction : 0;
    const cls = job.status === "succeeded" ? "bar done" : job.status === "failed" ? "bar failed" : job.status === "cancelled" ? "bar stopped" : "bar";
    const pct = Math.round(frac * 1000) / 10;
    return h("div", { class: cls, role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100, "aria-valuenow": pct, "aria-label": `Progress of job ${job.id}: ${pct}%` },
      h("span", { style: `width:${Math.min(100, pct)}%` }));
  }

  function badge(status) {
    return h("span", { class: "badge " + status, dataset: { status } }, h("span", { class: "sym", "aria-hidden": "true", text: SYMBOL[status] || "?" }), status);
  }

  function precisionOf(job) {
    return (job.spec && job.spec.train && job.spec.train.precision) || "–";
  }

  /* ---------------- job actions ---------------- */

  function actionButtons(job, opts = {}) {
    const label = `job ${job.id} (${job.name})`;
    const small = opts.small ? " small" : "";
    const btns = [];
    if (job.status === "queued" || job.status === "running")
      btns.push(h("button", { type: "button", class: "btn" + small, "aria-label": `Cancel ${label}`, onclick: () => jobAction(job, "cancel") }, "Cancel"));
    if (job.status === "cancelled" || job.status === "failed")
      btns.push(h("button", { type: "button", class: "btn" + small, "aria-label": `Resume ${label}`, onclick: () => jobAction(job, "resume") }, "Resume"));
    if (!ACTIVE.has(job.status) && (job.progress || {}).step > 0)
      btns.push(h("button", { type: "button", class: "btn" + small, "aria-label": `Export a model from ${label}`, onclick: () => exportJob(job) }, "Export"));
    if (!(job.status === "running" || job.status === "cancelling"))
      btns.push(h("button", { type: "button", class: "btn danger" + small, "aria-label": `Delete ${label}`, onclick: () => deleteJob(job) }, "Delete"));
    return btns;
  }

  async function jobAction(job, what) {
    try {
      const updated = await api(`/api/jobs/${job.id}/${what}`, { method: "POST", body: {} });
      mergeJob(updated);
      toast(what === "cancel" ? `Job ${job.id}: ${updated.status === "cancelling" ? "stopping after its current step (a checkpoint is kept)" : "cancelled"}` : `Job ${job.id} queued to resume from its latest checkpoint`);
      afterJobChange(job.id);
    } catch (e) {
      toast(`Could not ${what} job ${job.id}: ${e.message}`, "error");
    }
  }

  async function exportJob(job, checkpoint) {
    const q = checkpoint ? `?checkpoint=${encodeURIComponent(checkpoint)}` : "";
    try {
      const r = await api(`/api/jobs/${job.id}/export${q}`, { method: "POST", body: {} });
      const m = r && r.model;
      toast(m ? `Exported model #${m.id} (${m.name}); it is ready in Translate` : "Model exported");
      state.models = null;
    } catch (e) {
      if (e.status === 404 && e.code === "not_found" && /route/.test(e.message)) toast("This server cannot export models yet.", "error");
      else toast(`Could not export job ${job.id}: ${e.message}`, "error");
    }
  }

  async function deleteJob(job) {
    const ok = await confirmDialog(`Delete job ${job.id}?`, `“${job.name}”, its metrics, validations, checkpoints and run directory will be removed. This cannot be undone.`, "Delete job");
    if (!ok) return;
    try {
      await api(`/api/jobs/${job.id}`, { method: "DELETE" });
      state.jobs.delete(job.id);
      if (state.order.includes(job.id)) state.total = Math.max(0, state.total - 1);
      state.order = state.order.filter((i) => i !== job.id);
      closeStream(job.id);
      const row = $("job-row-" + job.id);
      if (row) row.remove();
      toast(`Job ${job.id} deleted`);
      if (state.view === "job") location.hash = "#/jobs";
      renderJobsEmpty();
    } catch (e) {
      toast(`Could not delete job ${job.id}: ${e.message}`, "error");
    }
  }

  function afterJobChange(id) {
    if (state.view === "jobs") refreshJobs();
    if (state.view === "job" && state.detail && state.detail.id === id) refreshDetail(true);
  }

  /* ---------------- live updates: SSE with a polling fallback ---------------- */

  function mergeJob(job) {
    const old = state.jobs.get(job.id);
    state.jobs.set(job.id, job);
    if (old && old.status !== job.status) onStatusChange(job, old.status);
    syncStreams();
    return job;
  }

  function onStatusChange(job) {
    renderJobRow(job);
    if (state.view === "job" && state.detail && state.detail.id === job.id) refreshDetail(true);
  }

  function closeStream(id) {
    const s = state.streams.get(id);
    if (s) { s.es.close(); state.streams.delete(id); }
  }

  function closeAllStreams() {
    for (const id of Array.from(state.streams.keys())) closeStream(id);
  }

  /** Which jobs get an EventSource: the open detail job, then running jobs on screen, then
   * queued ones (so the switch to running and the `started` event arrive as they happen). */
  function syncStreams() {
    if (state.readsProtected || typeof EventSource !== "function") { setConn(connMode()); return; }
    const want = [];
    if (state.view === "job" && state.detail) {
      const j = state.jobs.get(state.detail.id);
      if (j && ACTIVE.has(j.status)) want.push(j.id);
    }
    if (state.view === "jobs") {
      for (const pass of [STREAMING, new Set(["queued"])]) {
        for (const id of state.order) {
          const j = state.jobs.get(id);
          if (j && pass.has(j.status) && !want.includes(id)) want.push(id);
        }
      }
    }
    const keep = new Set(want.slice(0, MAX_STREAMS));
    for (const id of Array.from(state.streams.keys())) if (!keep.has(id)) closeStream(id);
    for (const id of keep) if (!state.streams.has(id)) openStream(id);
    setConn(connMode());
  }

  function openStream(id) {
    const es = new EventSource(`/api/jobs/${id}/events`);
    const entry = { es, errors: 0, failed: false };
    state.streams.set(id, entry);
    const parse = (ev) => { try { return JSON.parse(ev.data); } catch (_) { return null; } };
    es.addEventListener("open", () => { entry.errors = 0; });
    es.addEventListener("status", (ev) => {
      const d = parse(ev);
      if (!d) return;
      const job = state.jobs.get(id);
      if (job && job.status !== d.status) {
        job.status = d.status;
        if (d.error) job.error = d.error;
        onStatusChange(job);
      }
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
      const job = state.jobs.get(id);
      if (!d || !job) return;
      job.progress.total_steps = d.total_steps;
      job.progress.resumed_from_step = d.resumed_from_step;
      scheduleRender(id);
    });
    es.addEventListener("step", (ev) => {
      const d = parse(ev);
      const job = state.jobs.get(id);
      if (!d || !job) return;
      const p = job.progress;
      p.step = d.step;
      p.epoch = d.epoch;
      if (p.total_steps) p.fraction = Math.min(1, d.step / p.total_steps);
      const m = job.metrics;
      m.loss = d.loss;
      m.lr = d.lr;
      m.loss_scale = d.loss_scale;
      m.tokens_per_s = d.tokens_per_s;
      if (d.step_ms > 0) m.steps_per_s = 1000 / d.step_ms;
      if (d.skipped) m.skipped_steps = (m.skipped_steps || 0) + 1;
      const r = state.rates.get(id) || [];
      const now = Date.now();
      r.push([now, d.step]);
      while (r.length > 2 && now - r[0][0] > 10000) r.shift();
      state.rates.set(id, r);
      if (state.detail && state.detail.id === id) liveStep(d);
      scheduleRender(id);
    });
    es.addEventListener("validation", () => { if (state.detail && state.detail.id === id) loadValidations(); });
    es.addEventListener("checkpoint", () => { if (state.detail && state.detail.id === id) debounce("ckpts", loadCheckpoints, 500); });
    es.addEventListener("overflow", () => { if (state.detail && state.detail.id === id) debounce("overflows", loadOverflows, 1000); });
    es.addEventListener("recovery", () => { if (state.detail && state.detail.id === id) { loadOverflows(); loadMetrics(); } });
    es.addEventListener("lagged", () => refreshOne(id));
    es.onerror = () => {
      entry.errors++;
      if (es.readyState === EventSource.CLOSED || entry.errors >= 3) {
        // Fall back to polling for this job (the tick below refreshes it).
        closeStream(id);
        setConn(connMode());
      }
    };
  }

  const pendingRender = new Set();
  let renderQueued = false;
  function scheduleRender(id) {
    pendingRender.add(id);
    if (renderQueued) return;
    renderQueued = true;
    requestAnimationFrame(() => {
      renderQueued = false;
      for (const i of pendingRender) {
        const job = state.jobs.get(i);
        if (!job) continue;
        renderJobRow(job);
        if (state.detail && state.detail.id === i) renderDetailHeader(job);
      }
      pendingRender.clear();
    });
  }

  const timers = {};
  function debounce(key, fn, ms) {
    clearTimeout(timers[key]);
    timers[key] = setTimeout(fn, ms);
  }

  async function refreshOne(id) {
    try {
      const job = await api(`/api/jobs/${id}`);
      mergeJob(job);
      scheduleRender(id);
    } catch (e) {
      if (e.status === 404) {
        state.jobs.delete(id);
        const row = $("job-row-" + id);
        if (row) row.remove();
      }
    }
  }

  /* ---------------- jobs view ---------------- */

  async function refreshJobs() {
    state.lastJobsFetch = Date.now();
    const status = $("jobs-filter").value;
    try {
      const data = await api(`/api/jobs?limit=100${status ? "&status=" + status : ""}`);
      const ids = data.jobs.map((j) => j.id);
      for (const j of data.jobs) {
        // Keep SSE-fed numbers that are newer than the list's.
        const old = state.jobs.get(j.id);
        if (old && state.streams.has(j.id) && old.status === j.status && (old.progress.step || 0) > (j.progress.step || 0)) {
          j.progress = old.progress;
          j.metrics = old.metrics;
        }
        mergeJob(j);
      }
      state.order = ids;
      state.total = data.total;
      renderJobs();
      syncStreams();
    } catch (e) {
      if (e.status !== 0) toast(`Could not load jobs: ${e.message}`, "error");
    }
  }

  function renderJobsEmpty() {
    const filtered = $("jobs-filter").value;
    $("jobs-empty").hidden = state.order.length > 0 || !!filtered;
    $("jobs-table").hidden = state.order.length === 0 && !filtered;
    $("jobs-total").textContent = state.total > state.order.length ? `Showing the newest ${state.order.length} of ${state.total} jobs.` : "";
  }

  function renderJobs() {
    const body = $("jobs-body");
    const want = state.order.map((id) => "job-row-" + id);
    for (const row of Array.from(body.children)) if (!want.includes(row.id)) row.remove();
    let prev = null;
    for (const id of state.order) {
      const job = state.jobs.get(id);
      let row = $("job-row-" + id);
      if (!row) row = renderJobRow(job, true);
      else renderJobRow(job);
      const expected = prev ? prev.nextSibling : body.firstChild;
      if (row !== expected) body.insertBefore(row, expected);
      prev = row;
    }
    renderJobsEmpty();
  }

  function renderJobRow(job, create) {
    let row = $("job-row-" + job.id);
    if (!row) {
      if (!create) return null;
      row = h("tr", { id: "job-row-" + job.id, dataset: { id: job.id } },
        h("td", { class: "num", "data-label": "ID", text: job.id }),
        h("td", { class: "name-cell", "data-label": "Name" }),
        h("td", { class: "status-cell", "data-label": "Status" }),
        h("td", { class: "prec-cell", "data-label": "Precision" }),
        h("td", { class: "dev-cell", "data-label": "Device" }),
        h("td", { class: "progress-cell", "data-label": "Progress" }),
        h("td", { class: "num loss-cell", "data-label": "Loss" }),
        h("td", { class: "num scale-cell", "data-label": "Loss scale" }),
        h("td", { class: "num skip-cell", "data-label": "Skipped" }),
        h("td", { class: "actions-cell", "data-label": "Actions" }));
      $("jobs-body").append(row);
    }
    const c = row.children;
    if (row.dataset.name !== job.name) {
      row.dataset.name = job.name;
      c[1].replaceChildren(h("a", { class: "name", href: `#/jobs/${job.id}`, text: job.name }));
    }
    if (row.dataset.status !== job.status) {
      row.dataset.status = job.status;
      c[2].replaceChildren(badge(job.status));
      if (job.status === "failed" && job.error) c[2].append(h("span", { class: "sub", title: job.error, text: job.error.slice(0, 80) }));
      c[9].replaceChildren(h("div", { class: "row-actions" }, actionButtons(job, { small: true })));
    }
    c[3].replaceChildren(h("span", { class: "tag", text: precisionOf(job) }));
    c[4].textContent = job.device || "–";
    const bar = progressBar(job);
    c[5].replaceChildren(bar, h("div", { class: "progress-text", text: progressText(job) }));
    c[6].textContent = fmt.num(job.metrics.loss);
    c[7].textContent = fmt.scale(job.metrics.loss_scale);
    c[8].textContent = fmt.int(job.metrics.skipped_steps);
    return row;
  }

  /* ---------------- job detail ---------------- */

  async function enterJob(id) {
    state.detail = { id, metrics: [], downsampled: false, validations: [], checkpoints: [], lastMetrics: 0, lastJob: 0, liveSince: 0 };
    $("h-job").textContent = `Job ${id}`;
    $("job-facts").replaceChildren();
    $("job-progress").replaceChildren();
    $("job-actions").replaceChildren();
    $("job-error").hidden = true;
    $("samples").replaceChildren();
    $("ckpts").replaceChildren();
    $("samples-step").replaceChildren();
    drawDetailCharts();
    await refreshDetail(true);
  }

  async function refreshDetail(all) {
    const d = state.detail;
    if (!d) return;
    let job;
    try {
      job = await api(`/api/jobs/${d.id}`);
    } catch (e) {
      if (e.status === 404) {
        $("h-job").textContent = `Job ${d.id}`;
        $("job-progress").replaceChildren(h("p", { class: "alert error", text: `There is no job ${d.id} (it may have been deleted).` }));
        state.detail = null;
      } else if (e.status !== 0) toast(`Could not load job ${d.id}: ${e.message}`, "error");
      return;
    }
    if (state.detail !== d) return;
    d.lastJob = Date.now();
    mergeJob(job);
    renderDetailHeader(job, true);
    if (all) await Promise.all([loadMetrics(), loadValidations(), loadCheckpoints(), loadOverflows()]);
    else if (!state.streams.has(d.id) && ACTIVE.has(job.status)) await Promise.all([loadMetrics(), loadValidations()]);
  }

  function renderDetailHeader(job, full) {
    const d = state.detail;
    if (!d || d.id !== job.id) return;
    $("h-job").replaceChildren(`${job.name} `, h("span", { class: "muted", text: `#${job.id}` }));
    $("job-progress").replaceChildren(
      h("div", { class: "card-head" }, badge(job.status), h("span", { class: "progress-text", id: "job-progress-text", text: progressText(job) })),
      progressBar(job));
    if (full || d.status !== job.status) {
      d.status = job.status;
      $("job-actions").replaceChildren(...actionButtons(job), h("a", { class: "btn", href: `#/compare?a=${job.id}` }, "Compare…"));
      const err = $("job-error");
      err.hidden = !job.error;
      err.textContent = job.error ? `This job failed: ${job.error}` : "";
    }
    const s = job.spec || {}, m = s.model || {}, t = s.train || {}, data = s.data || {}, mt = job.metrics || {}, p = job.progress || {};
    const base = (x) => (x ? String(x).split("/").slice(-2).join("/") : "–");
    const facts = [
      ["Precision", `${t.precision || "–"}${t.precision === "f16" || (s.amp && s.amp.enabled) ? " + loss scaling" : ""}`],
      ["Device", job.device || "–"],
      ["Model", m.d_model ? `d${m.d_model} · ${m.layers}+${m.layers} layers · ${m.heads} heads` : "–"],
      ["Data", `${base(data.train)} (${data.src_lang || "?"}→${data.tgt_lang || "?"})`],
      ["Batch", t.max_tokens ? `${t.max_tokens} tokens` : `${t.batch_size} sentences`],
      ["Step", `${fmt.int(p.step)} / ${p.total_steps ? fmt.int(p.total_steps) : "?"} (epoch ${p.epoch ?? "–"})`],
      ["Loss", fmt.num(mt.loss)],
      ["Val loss", fmt.num(mt.val_loss)],
      ["Best BLEU", mt.best_bleu !== null && mt.best_bleu !== undefined ? `${fmt.num(mt.best_bleu, 2)} @ ${mt.best_bleu_step}` : "–"],
      ["Tokens/s", fmt.int(mt.tokens_per_s)],
      ["Loss scale", fmt.scale(mt.loss_scale)],
      ["Skipped steps", fmt.int(mt.skipped_steps)],
      ["Started", fmt.time(job.started_at) + (job.attempts > 1 ? ` (attempt ${job.attempts})` : "")],
      ["Finished", fmt.time(job.finished_at)],
    ];
    if (job.parent_job_id !== null && job.parent_job_id !== undefined) {
      facts.splice(1, 0, ["Forked from", h("a", { id: "job-parent", href: `#/jobs/${job.parent_job_id}`, text: `job #${job.parent_job_id} at step ${fmt.int(job.parent_checkpoint)}` })]);
    }
    $("job-facts").replaceChildren(...facts.map(([k, v]) => h("div", null, h("dt", { text: k }), v instanceof Node ? h("dd", null, v) : h("dd", { text: v }))));
  }

  async function loadMetrics() {
    const d = state.detail;
    if (!d) return;
    try {
      const r = await api(`/api/jobs/${d.id}/metrics?points=400`);
      if (state.detail !== d) return;
      d.metrics = r.points;
      d.downsampled = r.downsampled;
      d.lastMetrics = Date.now();
      drawDetailCharts();
    } catch (e) {
      if (e.status !== 0) toast(`Could not load metrics: ${e.message}`, "error");
    }
  }

  /** An SSE step for the open job: extend the curves without refetching. */
  function liveStep(ev) {
    const d = state.detail;
    const last = d.metrics[d.metrics.length - 1];
    if (last && ev.step <= last.step) return;
    d.metrics.push({ ...ev, bucket: 1 });
    if (d.metrics.length > 800) { loadMetrics(); return; }
    if (Date.now() - (d.lastDraw || 0) > 1000) drawDetailCharts();
    else debounce("draw", drawDetailCharts, 1000);
  }

  function scalerOn(job) {
    const s = (job && job.spec) || {};
    if (s.amp && s.amp.enabled !== null && s.amp.enabled !== undefined) return s.amp.enabled;
    return s.train && s.train.precision === "f16";
  }

  function drawDetailCharts() {
    const d = state.detail;
    if (!d) return;
    d.lastDraw = Date.now();
    const job = state.jobs.get(d.id);
    const pts = d.metrics;
    const exact = pts.every((p) => (p.bucket || 1) === 1);
    $("loss-note").textContent = pts.length
      ? exact ? `(${pts.length} steps)` : `(${pts.length} points; band = min–max loss in each group of steps)`
      : "";
    Chart.line($("chart-loss"), {
      label: "Training loss by step",
      xLabel: "step", yLabel: "loss", height: 260,
      yFormat: (v) => Chart.compact(v),
      series: [{ name: "loss", band: !exact, points: pts.map((p) => ({ x: p.step, y: p.loss, lo: p.loss_min, hi: p.loss_max, bucket: p.bucket })) }],
      empty: job && job.status === "queued" ? "Waiting for the first step" : "No steps recorded yet",
    });
    const on = scalerOn(job);
    // Marks come from each point's exact counts (bucket_skipped / bucket_overflowed), not from
    // scale drops: hysteresis or a floor at min_scale can hide an overflow from the scale.
    const scalePts = pts.map((p) => {
      const skipped = p.bucket_skipped ?? (p.skipped ? 1 : 0);
      const over = p.bucket_overflowed ?? (p.found_inf ? 1 : 0);
      let mark = skipped > 0 || over > 0, note = null;
      if (mark && (p.bucket || 1) === 1) note = "step skipped: inf/NaN gradients, scale backed off";
      else if (mark) note = `${skipped} of ${p.bucket} steps skipped (${over} with inf/NaN gradients)`;
      return { x: p.step, y: p.loss_scale, mark, note };
    });
    Chart.line($("chart-scale"), {
      label: "Loss scale by step, log axis", xLabel: "step", yLabel: "scale", log: true,
      series: [{ name: "loss scale", points: on ? scalePts : [] }],
      yFormat: (v) => fmt.scale(v),
      empty: job && !on ? `Loss scaling is off for this run (${precisionOf(job)})` : "No steps recorded yet",
    });
    Chart.line($("chart-tps"), {
      label: "Training throughput in target tokens per second", xLabel: "step", yLabel: "tokens/s", zero: true,
      series: [{ name: "tokens/s", points: pts.map((p) => ({ x: p.step, y: p.tokens_per_s })) }],
    });
    const v = d.validations;
    Chart.line($("chart-val"), {
      label: "Validation loss by step", xLabel: "step", yLabel: "val loss",
      series: [{ name: "val loss", points: v.map((x) => ({ x: x.step, y: x.val_loss })) }],
      empty: "No validation yet",
    });
    Chart.line($("chart-bleu"), {
      label: "Validation BLEU and chrF by step", xLabel: "step", yLabel: "score", zero: true, legend: true,
      series: [
        { name: "BLEU", points: v.map((x) => ({ x: x.step, y: x.bleu })) },
        { name: "chrF", points: v.map((x) => ({ x: x.step, y: x.chrf })) },
      ],
      yFormat: (x) => Chart.compact(x),
      empty: "No validation yet",
    });
  }

  async function loadValidations() {
    const d = state.detail;
    if (!d) return;
    try {
      const r = await api(`/api/jobs/${d.id}/validations`);
      if (state.detail !== d) return;
      d.validations = r.validations;
      drawDetailCharts();
      const sel = $("samples-step");
      const cur = sel.value;
      sel.replaceChildren(...d.validations.slice().reverse().map((x) => h("option", { value: x.step, text: `${x.step} (BLEU ${fmt.num(x.bleu, 2)})` })));
      if (cur && d.validations.some((x) => String(x.step) === cur)) sel.value = cur;
      renderSamples();
    } catch (e) {
      if (e.status !== 0) toast(`Could not load validations: ${e.message}`, "error");
    }
  }

  function renderSamples() {
    const d = state.detail;
    const out = $("samples");
    const step = Number($("samples-step").value);
    const v = d && d.validations.find((x) => x.step === step);
    $("samples-step").closest("label").hidden = !d || !d.validations.length;
    if (!v) {
      out.replaceChildren(h("p", { class: "muted", text: "Samples appear after the first validation (train.valid_every, or at the end of each epoch)." }));
      return;
    }
    const rows = (v.samples || []).map((s) => h("tr", null, h("td", { class: "src", text: s.source }), h("td", { text: s.reference }), h("td", { class: "hyp", text: s.hypothesis || "(empty)" })));
    out.replaceChildren(
      h("p", { class: "muted small tnum", text: `Step ${v.step}: val loss ${fmt.num(v.val_loss)}, BLEU ${fmt.num(v.bleu, 2)}, chrF ${fmt.num(v.chrf, 2)}, CER ${fmt.num(v.cer, 3)}, WER ${fmt.num(v.wer, 3)} over ${v.sentences} sentences.` }),
      rows.length
        ? h("div", { class: "table-wrap" }, h("table", { class: "samples" },
            h("thead", null, h("tr", null, h("th", { scope: "col", text: "Source" }), h("th", { scope: "col", text: "Reference" }), h("th", { scope: "col", text: "Model output" }))),
            h("tbody", null, rows)))
        : h("p", { class: "muted", text: "This validation kept no samples (train.valid_samples = 0)." }));
  }

  async function loadCheckpoints() {
    const d = state.detail;
    if (!d) return;
    try {
      const r = await api(`/api/jobs/${d.id}/checkpoints`);
      if (state.detail !== d) return;
      d.checkpoints = r.checkpoints;
      const job = state.jobs.get(d.id);
      const out = $("ckpts");
      if (!r.checkpoints.length) {
        out.replaceChildren(h("p", { class: "muted", text: "No checkpoints yet (checkpoint.every_steps, and one at the end)." }));
        return;
      }
      const canExport = job && !ACTIVE.has(job.status);
      out.replaceChildren(h("div", { class: "table-wrap" }, h("table", { class: "ckpts" },
        h("thead", null, h("tr", null, ["Step", "Epoch", "Size", "Val BLEU", "Best", "File", ""].map((t, i) => h("th", { scope: "col", class: i < 4 ? "num" : null, text: t })))),
        h("tbody", null, r.checkpoints.map((c) => h("tr", null,
          h("td", { class: "num", text: fmt.int(c.step) }),
          h("td", { class: "num", text: c.epoch }),
          h("td", { class: "num", text: fmt.bytes(c.size_bytes) }),
          h("td", { class: "num", text: fmt.num(c.val_bleu, 2) }),
          h("td", { text: c.is_best ? "★ best" : "" }),
          h("td", { text: c.exists ? "present" : "missing" }),
          h("td", null, canExport && c.exists ? h("button", { type: "button", class: "btn small", "aria-label": `Export a model from the checkpoint at step ${c.step}`, onclick: () => exportJob(job, String(c.step)) }, "Export") : null)))))));
    } catch (e) {
      if (e.status !== 0) toast(`Could not load checkpoints: ${e.message}`, "error");
    }
  }

  const OVERFLOW_ROWS = 10;

  /** "2¹⁶ ×3, 2¹⁵ ×1", or the range when there are many scales. */
  function scalesText(scales) {
    if (scales.length <= 3) return scales.map((s) => `${fmt.scale(s.loss_scale)} ×${s.steps}`).join(", ");
    const n = scales.reduce((a, s) => a + s.steps, 0);
    return `${fmt.scale(scales[0].loss_scale)} … ${fmt.scale(scales[scales.length - 1].loss_scale)} (${scales.length} scales, ${n} steps)`;
  }

  /** Overflow forensics: which tensors and layers overflow, how often, at which loss scales. */
  async function loadOverflows() {
    const d = state.detail;
    if (!d) return;
    try {
      const r = await api(`/api/jobs/${d.id}/overflows?recent=5`);
      if (state.detail !== d) return;
      const out = $("overflows");
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
        if (r.tensors.length > OVERFLOW_ROWS) parts.push(h("p", { class: "muted", id: "overflow-more", text: `…and ${r.tensors.length - OVERFLOW_ROWS} more tensors (GET /api/jobs/${d.id}/overflows lists all).` }));
        if (r.activations.length) {
          parts.push(h("p", { id: "overflow-activations", text: "First activation beyond f16: " + r.activations.map((a) => `${a.activation} (${a.steps} steps)`).join(", ") }));
        }
        parts.push(h("ul", { class: "overflow-recent", id: "overflow-recent" }, r.recent.map((e) =>
          h("li", { text: `step ${e.step} at scale ${fmt.scale(e.loss_scale)}: ${e.tensors.map((t) => t.tensor).join(", ") || (e.loss_finite ? "–" : "loss not finite")}` }))));
      }
      if (u) parts.push(h("p", { class: "muted", id: "overflow-underflow", text: `f16 underflow at step ${u.step} (scale ${fmt.scale(u.loss_scale)}): ${pct(u.underflow_share)} of gradient values below f16's smallest subnormal, ${pct(u.zero_share)} zero.` }));
      out.replaceChildren(...parts);
    } catch (e) {
      if (e.status !== 0) toast(`Could not load overflows: ${e.message}`, "error");
    }
  }

  /* ---------------- downloads: charts as PNG / SVG, metrics as CSV ---------------- */

  function saveBlob(blob, filename) {
    const url = URL.createObjectURL(blob);
    const a = h("a", { href: url, download: filename, hidden: true });
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10_000);
  }

  function fileStem(job, what) {
    const name = job && job.name ? job.name.replace(/[^A-Za-z0-9._-]+/g, "-") : "job";
    return `job-${job ? job.id : "x"}-${name}-${what}`;
  }

  /** PNG and SVG buttons on a chart card; `what` names the file, `title` heads the picture. */
  function chartButtons(hostId, what, title, jobOf, headingOf, stem) {
    const save = async (kind) => {
      const host = $(hostId);
      const job = jobOf();
      const heading = headingOf ? headingOf() : job ? `${title} · #${job.id} ${job.name}` : title;
      try {
        const blob = kind === "svg"
          ? (() => { const t = Chart.svgText(host, heading); return t && new Blob([t], { type: "image/svg+xml" }); })()
          : await Chart.pngBlob(host, heading);
        if (!blob) { toast("This chart has no data to download yet.", "error"); return; }
        saveBlob(blob, `${stem || fileStem(job, what)}.${kind}`);
      } catch (e) {
        toast(`Could not make the ${kind.toUpperCase()}: ${e.message}`, "error");
      }
    };
    return ["png", "svg"].map((kind) => h("button", {
      type: "button", class: "btn small ghost", "data-download": kind,
      "aria-label": `Download the ${title.toLowerCase()} chart as ${kind.toUpperCase()}`, onclick: () => save(kind),
    }, kind.toUpperCase()));
  }

  const CSV_COLUMNS = ["step", "epoch", "loss", "lr", "loss_scale", "found_inf", "skipped", "grad_norm", "tokens_per_s", "step_ms"];

  /** Every metric row of a job (paged, not downsampled) as CSV, with elapsed_s = running sum of step_ms. */
  async function metricsCsv(id) {
    const lines = [[...CSV_COLUMNS, "elapsed_s"].join(",")];
    let after = 0, elapsedMs = 0;
    for (;;) {
      const r = await api(`/api/jobs/${id}/metrics?after_step=${after}&limit=100000`);
      if (!r.points.length) break;
      for (const p of r.points) {
        elapsedMs += p.step_ms > 0 ? p.step_ms : 0;
        const cells = CSV_COLUMNS.map((k) => (p[k] === null || p[k] === undefined ? "" : typeof p[k] === "boolean" ? (p[k] ? 1 : 0) : p[k]));
        lines.push([...cells, (elapsedMs / 1000).toFixed(3)].join(","));
      }
      if (r.next_after_step === null || r.next_after_step === undefined || r.next_after_step <= after) break;
      after = r.next_after_step;
    }
    return lines.join("\n") + "\n";
  }

  function csvButton(jobOf) {
    return h("button", {
      type: "button", class: "btn small ghost", "data-download": "csv", "aria-label": "Download every metric row as CSV",
      onclick: async () => {
        const job = jobOf();
        if (!job) return;
        try {
          saveBlob(new Blob([await metricsCsv(job.id)], { type: "text/csv" }), `${fileStem(job, "metrics")}.csv`);
        } catch (e) {
          toast(`Could not download the metrics: ${e.message}`, "error");
        }
      },
    }, "CSV");
  }

  const DETAIL_CHARTS = [
    ["chart-loss", "loss", "Training loss"],
    ["chart-val", "val-loss", "Validation loss"],
    ["chart-bleu", "bleu", "BLEU and chrF"],
    ["chart-scale", "loss-scale", "Loss scale"],
    ["chart-tps", "tokens-per-s", "Throughput"],
  ];

  function addDetailDownloads() {
    const jobOf = () => state.detail && state.jobs.get(state.detail.id);
    for (const [id, what, title] of DETAIL_CHARTS) {
      const cap = $(id).closest("figure").querySelector("figcaption");
      const extra = id === "chart-loss" ? [csvButton(jobOf)] : [];
      cap.appendChild(h("span", { class: "dl", role: "group", "aria-label": `Download ${title.toLowerCase()}` }, ...chartButtons(id, what, title, jobOf), ...extra));
    }
  }

  /* ---------------- compare ---------------- */

  const median = (xs) => {
    const v = xs.filter((x) => x !== null && x !== undefined && isFinite(x)).sort((a, b) => a - b);
    if (!v.length) return null;
    const m = v.length >> 1;
    return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2;
  };

  async function enterCompare(params) {
    let list;
    try {
      list = (await api("/api/jobs?limit=200")).jobs.filter((j) => (j.progress || {}).step > 0);
    } catch (e) {
      $("compare-out").replaceChildren(h("p", { class: "alert error", text: `Could not load jobs: ${e.message}` }));
      return;
    }
    for (const j of list) if (!state.jobs.has(j.id)) state.jobs.set(j.id, j);
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
    await renderCompare();
  }

  async function renderCompare() {
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
    state.compare = { A, B, label };
    drawCompareChart();
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

  function drawCompareChart() {
    const c = state.compare, host = $("chart-compare");
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

  /* ---------------- new job form ---------------- */

  const FORM_FIELDS = [
    ["f-precision", "train.precision", "string"],
    ["f-epochs", "train.epochs", "int"],
    ["f-batch", "train.batch_size", "int"],
    ["f-steps", "train.max_steps", "int"],
  ];

  function clearFormErrors(form) {
    form.querySelectorAll(".field-error").forEach((e) => (e.textContent = ""));
    form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
    const fe = form.querySelector(".alert.error");
    if (fe) { fe.hidden = true; fe.textContent = ""; }
  }

  /** Show an API error next to the field it names, else at the top of the form. */
  function showFieldError(form, field, message, fallbackId) {
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

  async function enterNew() {
    const sel = $("f-config");
    if (!state.configs) {
      try {
        state.configs = (await api("/api/configs")).configs;
      } catch (e) {
        showFieldError($("new-form"), null, `Could not load the presets: ${e.message}`, "form-error");
        return;
      }
      sel.replaceChildren(...state.configs.map((c) => h("option", { value: c.name, disabled: !c.spec, text: c.spec ? c.name : `${c.name} (unavailable)` })));
      const first = state.configs.find((c) => c.name === "tiny" && c.spec) || state.configs.find((c) => c.spec);
      if (first) sel.value = first.name;
      fillFromPreset();
    }
  }

  function fillFromPreset() {
    const c = (state.configs || []).find((x) => x.name === $("f-config").value);
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

  async function submitNew(ev) {
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
      mergeJob(job);
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

  /* ---------------- translate ---------------- */

  async function enterTranslate() {
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
    sel.replaceChildren(...models.map((m) => h("option", { value: m.id, text: `#${m.id} ${m.name} · ${m.src_lang}→${m.tgt_lang} · ${m.dtype}${score(m)}` })));
    if (cur && models.some((m) => String(m.id) === cur)) sel.value = cur;
    const empty = models.length === 0;
    none.hidden = !empty;
    none.textContent = empty ? "No models yet. A job that succeeds is exported automatically; a stopped one can be exported with its Export button." : "";
    for (const id of ["tr-model", "tr-beam", "tr-text", "tr-submit"]) $(id).disabled = empty;
  }

  async function submitTranslate(ev) {
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

  /* ---------------- routing ---------------- */

  function route() {
    const hash = location.hash || "#/jobs";
    const [path, query] = hash.replace(/^#\/?/, "").split("?");
    const parts = path.split("/").filter(Boolean);
    const params = new URLSearchParams(query || "");
    let view = parts[0] || "jobs";
    if (!["jobs", "compare", "experiments", "new", "translate"].includes(view)) view = "jobs";
    const id = view === "jobs" && parts[1] ? Number(parts[1]) : null;
    if (id) view = "job";
    const prev = state.view;
    state.view = view;
    if (view !== "job") state.detail = null;
    for (const v of ["jobs", "job", "compare", "experiments", "new", "translate"]) $("view-" + v).hidden = v !== view;
    const navKey = view === "job" ? "jobs" : view;
    document.querySelectorAll("nav a").forEach((a) => {
      if (a.dataset.nav === navKey) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
    document.title = { jobs: "Jobs", job: `Job ${id}`, compare: "Compare", experiments: "Experiments", new: "New job", translate: "Translate" }[view] + " · ampserve";
    if (prev && prev !== view) $("main").focus({ preventScroll: true });
    if (view === "jobs") refreshJobs();
    else if (view === "job") enterJob(id);
    else if (view === "compare") enterCompare(params);
    else if (view === "experiments") experiments.enter(parts[1] ? Number(parts[1]) : null);
    else if (view === "new") enterNew();
    else if (view === "translate") enterTranslate();
    syncStreams();
  }

  /* Once a second: tick the tqdm clocks, and poll what SSE does not cover. */
  function tick() {
    const now = Date.now();
    if (document.hidden) return;
    if (state.view === "jobs") {
      const active = state.order.some((id) => ACTIVE.has((state.jobs.get(id) || {}).status));
      const unstreamed = state.order.some((id) => STREAMING.has((state.jobs.get(id) || {}).status) && !state.streams.has(id));
      const every = unstreamed ? 2000 : active ? 4000 : 5000;
      if (now - state.lastJobsFetch >= every) refreshJobs();
      else for (const id of state.order) { const j = state.jobs.get(id); if (j && j.status === "running") renderJobRow(j); }
    } else if (state.view === "job" && state.detail) {
      const d = state.detail;
      const job = state.jobs.get(d.id);
      const live = state.streams.has(d.id);
      const every = job && ACTIVE.has(job.status) ? (live ? 10000 : 2000) : 30000;
      if (now - d.lastJob >= every) refreshDetail(false);
      else if (job && job.status === "running") { const t = $("job-progress-text"); if (t) t.textContent = progressText(job); }
    } else if (state.view === "experiments") experiments.tick();
  }

  // static/experiments.js: the Experiments view, given this file's helpers.
  const experiments = window.AmpExperiments({ h, $, api, fmt });

  function init() {
    window.addEventListener("hashchange", route);
    experiments.init();
    $("jobs-filter").addEventListener("change", () => { state.order = []; $("jobs-body").replaceChildren(); refreshJobs(); });
    $("samples-step").addEventListener("change", renderSamples);
    $("cmp-a").addEventListener("change", renderCompare);
    $("cmp-b").addEventListener("change", renderCompare);
    for (const r of document.querySelectorAll('input[name="cmp-x"]')) r.addEventListener("change", drawCompareChart);
    $("compare-form").addEventListener("submit", (e) => e.preventDefault());
    $("f-config").addEventListener("change", () => { clearFormErrors($("new-form")); fillFromPreset(); });
    $("new-form").addEventListener("submit", submitNew);
    $("tr-form").addEventListener("submit", submitTranslate);
    $("token-btn").hidden = !state.token;
    $("token-btn").addEventListener("click", async () => {
      state.tokenDeclined = false;
      if (await askToken("")) { toast("Token saved for this tab"); route(); }
    });
    addDetailDownloads();
    setConn("idle");
    probeReads().finally(() => {
      route();
      setInterval(tick, 1000);
    });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
