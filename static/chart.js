/* A small SVG line-chart ES module for the status page: axes with "nice" ticks, an optional log
 * y axis, a min/max band, point markers, and a hover / keyboard tooltip. No dependencies.
 *
 *   Chart.line(element, {
 *     series: [{name, points: [{x, y, lo?, hi?, mark?, note?}], band?: bool}],
 *     xLabel, yLabel, log?: bool, yFormat?: fn, xFormat?: fn, height?: px,
 *     empty?: "text when there is no data", label: "what the chart shows (for screen readers)",
 *     zero?: bool (include 0 on the y axis), xInteger?: bool (default true: whole-number x ticks)
 *   })
 * Calling it again on the same element redraws with the new options.
 *
 *   Chart.svgText(element, title) -> a standalone SVG document of the drawn chart (or null)
 *   Chart.pngBlob(element, title, scale?) -> Promise of a PNG Blob of the same picture (or null) */
const NS = "http://www.w3.org/2000/svg";
const DASH = ["", "7 4", "2 3"];

function el(name, attrs, parent) {
  const e = document.createElementNS(NS, name);
  for (const k in attrs) if (attrs[k] !== undefined && attrs[k] !== null) e.setAttribute(k, attrs[k]);
  if (parent) parent.appendChild(e);
  return e;
}

/** Compact number: 65536 -> "65.5k", 0.000123 -> "1.23e-4". */
function compact(v) {
  if (v === null || v === undefined || !isFinite(v)) return "–";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e9) return trim(v / 1e9) + "G";
  if (a >= 1e6) return trim(v / 1e6) + "M";
  if (a >= 1e4) return trim(v / 1e3) + "k";
  if (a >= 100) return String(Math.round(v));
  if (a >= 1) return trim(v, 2);
  if (a >= 0.01) return trim(v, 3);
  return v.toExponential(1);
}
function trim(v, digits) {
  return String(Number(v.toFixed(digits === undefined ? 1 : digits)));
}

function niceStep(span, count) {
  const raw = span / Math.max(1, count);
  const mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const n = raw / mag;
  return (n >= 5 ? 10 : n >= 2 ? 5 : n >= 1 ? 2 : 1) * mag;
}
function linearTicks(lo, hi, count, integer) {
  const step = integer ? Math.max(1, niceStep(hi - lo, count)) : niceStep(hi - lo, count);
  const a = Math.floor(lo / step + 1e-9) * step, b = Math.ceil(hi / step - 1e-9) * step;
  const out = [];
  for (let i = 0, t = a; t <= b + step * 1e-9; i++, t = a + i * step) out.push(+t.toPrecision(12));
  return { ticks: out, lo: a, hi: b };
}
/** Powers of 2 when the range is narrow (loss scales are powers of 2), else of 10. */
function logTicks(lo, hi, count) {
  const base = Math.log2(hi / lo) <= 24 ? 2 : 10;
  const lg = (v) => Math.log(v) / Math.log(base);
  let a = Math.floor(lg(lo) + 1e-9), b = Math.ceil(lg(hi) - 1e-9);
  if (a === b) { a -= 1; b += 1; }
  const every = Math.max(1, Math.ceil((b - a) / count));
  const ticks = [];
  for (let k = a; k <= b; k++) if ((k - a) % every === 0) ticks.push(Math.pow(base, k));
  return { ticks, lo: Math.pow(base, a), hi: Math.pow(base, b) };
}

function fmtDefault(v) { return compact(v); }

function render(host) {
  const o = host._chart;
  host.textContent = "";
  const series = (o.series || []).map((s) => ({
    ...s,
    points: (s.points || []).filter((p) => p && isFinite(p.x) && p.y !== null && p.y !== undefined && isFinite(p.y) && (!o.log || p.y > 0)),
  }));
  const all = series.flatMap((s) => s.points);
  const width = Math.max(240, host.clientWidth || 600);
  const height = o.height || 220;
  if (!all.length) {
    const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, height, role: "img", "aria-label": (o.label || "chart") + ": no data yet" }, host);
    svg.dataset.points = "0";
    const d = document.createElement("div");
    d.className = "nodata";
    d.textContent = o.empty || "No data yet";
    host.appendChild(d);
    return;
  }
  const yf = o.yFormat || fmtDefault, xf = o.xFormat || ((v) => compact(v));
  const m = { l: 56, r: 14, t: 12, b: 38 };
  const ph = height - m.t - m.b;
  let x0 = Math.min(...all.map((p) => p.x)), x1 = Math.max(...all.map((p) => p.x));
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const ys = all.flatMap((p) => [p.y, p.lo, p.hi]).filter((v) => v !== undefined && v !== null && isFinite(v) && (!o.log || v > 0));
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  if (o.zero && !o.log) { y0 = Math.min(0, y0); y1 = Math.max(0, y1); }
  if (y0 === y1) { const pad = Math.abs(y0) * 0.1 || 1; y0 -= pad; y1 += pad; }
  const yt = o.log ? logTicks(y0, y1, 6) : linearTicks(y0, y1, Math.max(3, Math.round(ph / 45)));
  y0 = yt.lo; y1 = yt.hi;
  // Room for the widest y tick label (about 6.5 px a character at 11 px) and the axis title.
  m.l = Math.max(44, Math.max(...yt.ticks.map((t) => String(yf(t)).length)) * 6.5 + 26);
  const pw = width - m.l - m.r;
  // x is a step count unless told otherwise: whole-number ticks.
  const xt = linearTicks(x0, x1, Math.max(2, Math.round(pw / 90)), o.xInteger !== false);
  const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * pw;
  const sy = o.log
    ? (y) => m.t + ph - ((Math.log(y) - Math.log(y0)) / (Math.log(y1) - Math.log(y0))) * ph
    : (y) => m.t + ph - ((y - y0) / (y1 - y0)) * ph;

  const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, height, role: "img", tabindex: 0 }, host);
  const last = series[0].points[series[0].points.length - 1];
  svg.setAttribute("aria-label", o.label + (last ? `; latest ${o.xLabel || "x"} ${xf(last.x)}: ${yf(last.y)}` : "") + ". Use the arrow keys to read values.");
  svg.dataset.points = String(all.length);

  const grid = el("g", { class: "grid" }, svg);
  const axis = el("g", { class: "axis" }, svg);
  for (const t of yt.ticks) {
    if (t < y0 - 1e-12 || t > y1 * (1 + 1e-12) + 1e-12) continue;
    const y = sy(t);
    el("line", { x1: m.l, x2: m.l + pw, y1: y, y2: y }, grid);
    const tx = el("text", { x: m.l - 6, y: y + 4, "text-anchor": "end", class: "tick" }, axis);
    tx.textContent = yf(t);
    tx.setAttribute("class", "tick");
  }
  for (const t of xt.ticks) {
    if (t < x0 || t > x1) continue;
    const x = sx(t);
    el("line", { x1: x, x2: x, y1: m.t + ph, y2: m.t + ph + 4 }, axis);
    const tx = el("text", { x, y: m.t + ph + 16, "text-anchor": "middle", class: "tick" }, axis);
    tx.textContent = xf(t);
  }
  el("line", { x1: m.l, x2: m.l + pw, y1: m.t + ph, y2: m.t + ph }, axis);
  el("line", { x1: m.l, x2: m.l, y1: m.t, y2: m.t + ph }, axis);
  if (o.xLabel) {
    const t = el("text", { x: m.l + pw, y: height - 4, "text-anchor": "end", class: "axis-label" }, svg);
    t.textContent = o.xLabel;
  }
  if (o.yLabel) {
    const t = el("text", { x: 12, y: m.t + ph / 2, "text-anchor": "middle", class: "axis-label", transform: `rotate(-90 12 ${m.t + ph / 2})` }, svg);
    t.textContent = o.yLabel + (o.log ? " (log)" : "");
  }

  series.forEach((s, i) => {
    const pts = s.points;
    if (!pts.length) return;
    const cls = "s" + (i % 3);
    if (s.band && pts.some((p) => p.lo !== undefined && p.lo !== null)) {
      const top = pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.hi ?? p.y).toFixed(1)}`);
      const bot = pts.slice().reverse().map((p) => `${sx(p.x).toFixed(1)},${sy(p.lo ?? p.y).toFixed(1)}`);
      el("path", { class: "band " + cls, d: "M" + top.join("L") + "L" + bot.join("L") + "Z" }, svg);
    }
    const d = "M" + pts.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join("L");
    el("path", { class: "line " + cls, d, "stroke-dasharray": DASH[i % 3] || null, "data-series": s.name }, svg);
    if (pts.length <= 40 || s.dots) {
      for (const p of pts) el("circle", { class: "dot " + cls, cx: sx(p.x), cy: sy(p.y), r: pts.length <= 12 ? 3 : 2 }, svg);
    }
    for (const p of pts) {
      if (!p.mark) continue;
      const x = sx(p.x), y = m.t;
      el("path", { class: "marker", d: `M${x - 5},${y} L${x + 5},${y} L${x},${y + 8} Z` }, svg).appendChild(
        Object.assign(document.createElementNS(NS, "title"), { textContent: p.note || "marked" }),
      );
    }
  });

  if (series.length > 1 || o.legend) {
    const lg = document.createElement("div");
    lg.className = "legend";
    series.forEach((s, i) => {
      const item = document.createElement("span");
      const sw = el("svg", { viewBox: "0 0 26 10", "aria-hidden": "true" });
      el("line", { x1: 1, x2: 25, y1: 5, y2: 5, class: "line s" + (i % 3), "stroke-dasharray": DASH[i % 3] || null }, sw);
      item.appendChild(sw);
      item.appendChild(document.createTextNode(s.name));
      lg.appendChild(item);
    });
    host.appendChild(lg);
  }

  // Hover / keyboard read-out.
  const cross = el("line", { class: "cross", y1: m.t, y2: m.t + ph, visibility: "hidden" }, svg);
  const hot = series.map((s, i) => el("circle", { class: "dot s" + (i % 3), r: 4.5, visibility: "hidden" }, svg));
  const tip = document.createElement("div");
  tip.className = "tip";
  tip.hidden = true;
  host.appendChild(tip);
  const xs = Array.from(new Set(all.map((p) => p.x))).sort((a, b) => a - b);
  let cur = -1;
  const nearest = (pts, x) => {
    let lo = 0, hi = pts.length - 1;
    while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (pts[mid].x < x) lo = mid; else hi = mid; }
    return Math.abs(pts[lo].x - x) <= Math.abs(pts[hi].x - x) ? pts[lo] : pts[hi];
  };
  const show = (idx) => {
    cur = Math.max(0, Math.min(xs.length - 1, idx));
    const x = xs[cur];
    const px = sx(x);
    cross.setAttribute("x1", px); cross.setAttribute("x2", px); cross.setAttribute("visibility", "visible");
    tip.textContent = "";
    const head = document.createElement("div");
    head.innerHTML = "<b></b>";
    head.firstChild.textContent = `${o.xLabel || "x"} ${xf(x)}`;
    tip.appendChild(head);
    series.forEach((s, i) => {
      if (!s.points.length) { hot[i].setAttribute("visibility", "hidden"); return; }
      const p = nearest(s.points, x);
      hot[i].setAttribute("cx", sx(p.x)); hot[i].setAttribute("cy", sy(p.y)); hot[i].setAttribute("visibility", "visible");
      const row = document.createElement("div");
      let text = `${s.name}: ${yf(p.y)}`;
      if (p.x !== x) text += ` (at ${xf(p.x)})`;
      if (p.lo !== undefined && p.lo !== null && p.hi !== undefined && p.bucket > 1) text += `  [${yf(p.lo)}–${yf(p.hi)} over ${p.bucket} steps]`;
      if (p.note) text += ` — ${p.note}`;
      row.textContent = text;
      tip.appendChild(row);
    });
    tip.hidden = false;
    const tw = tip.offsetWidth;
    const left = px + 12 + tw > width ? px - 12 - tw : px + 12;
    tip.style.left = Math.max(0, left) + "px";
    tip.style.top = m.t + 4 + "px";
  };
  const hide = () => {
    cross.setAttribute("visibility", "hidden");
    hot.forEach((h) => h.setAttribute("visibility", "hidden"));
    tip.hidden = true;
  };
  svg.addEventListener("pointermove", (ev) => {
    const r = svg.getBoundingClientRect();
    const x = x0 + (((ev.clientX - r.left) * (width / r.width) - m.l) / pw) * (x1 - x0);
    let best = 0;
    for (let i = 1; i < xs.length; i++) if (Math.abs(xs[i] - x) < Math.abs(xs[best] - x)) best = i;
    show(best);
  });
  svg.addEventListener("pointerleave", hide);
  svg.addEventListener("blur", hide);
  svg.addEventListener("focus", () => show(cur < 0 ? xs.length - 1 : cur));
  svg.addEventListener("keydown", (ev) => {
    const jump = Math.max(1, Math.round(xs.length / 20));
    if (ev.key === "ArrowLeft") show(cur - (ev.shiftKey ? jump : 1));
    else if (ev.key === "ArrowRight") show(cur + (ev.shiftKey ? jump : 1));
    else if (ev.key === "Home") show(0);
    else if (ev.key === "End") show(xs.length - 1);
    else if (ev.key === "Escape") hide();
    else return;
    ev.preventDefault();
  });
}

const observer = typeof ResizeObserver === "function"
  ? new ResizeObserver((entries) => {
      for (const e of entries) {
        const h = e.target;
        const w = Math.round(e.contentRect.width);
        if (h._chart && w && w !== h._chartWidth) { h._chartWidth = w; render(h); }
      }
    })
  : null;

/* ---- export: a standalone SVG (the page's CSS does not travel with a file, so the computed
 * colours and strokes are written onto each element) and a PNG rendered from it. ---- */
const STYLE_PROPS = ["fill", "fill-opacity", "stroke", "stroke-width", "stroke-dasharray", "stroke-opacity",
  "stroke-linejoin", "stroke-linecap", "opacity", "font-family", "font-size", "font-weight"];

function build(host, title) {
  const src = host && host.querySelector(":scope > svg");
  if (!src || src.dataset.points === "0") return null;
  const [, , width, height] = src.getAttribute("viewBox").split(" ").map(Number);
  const body = src.cloneNode(true);
  const from = [src, ...src.querySelectorAll("*")], to = [body, ...body.querySelectorAll("*")];
  from.forEach((e, i) => {
    const cs = getComputedStyle(e);
    to[i].setAttribute("style", STYLE_PROPS.map((p) => `${p}:${cs.getPropertyValue(p)}`).join(";"));
  });
  // The hover cross-hair and highlighted dots are not part of the picture.
  for (const e of to) if (e.getAttribute("visibility") === "hidden") e.remove();
  const bg = getComputedStyle(host.closest(".card") || document.body).backgroundColor;
  const ink = getComputedStyle(host).color;
  const head = title ? 22 : 0;
  const names = Array.from(host.querySelectorAll(":scope > .legend > span"), (s) => s.textContent);
  const foot = names.length ? 20 : 0;
  const W = width, H = height + head + foot;
  const svg = document.createElementNS(NS, "svg");
  svg.setAttribute("xmlns", NS);
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("width", W);
  svg.setAttribute("height", H);
  el("rect", { x: 0, y: 0, width: W, height: H, style: `fill:${bg}` }, svg);
  if (title) {
    const t = el("text", { x: 8, y: 16, style: `fill:${ink};font-family:${getComputedStyle(src).fontFamily};font-size:13px;font-weight:600` }, svg);
    t.textContent = title;
  }
  const g = el("g", { transform: `translate(0 ${head})` }, svg);
  while (body.firstChild) g.appendChild(body.firstChild);
  if (names.length) {
    const sw = Array.from(host.querySelectorAll(":scope > .legend line"));
    let x = 56;
    names.forEach((name, i) => {
      const y = head + height + 10;
      const cs = sw[i] ? getComputedStyle(sw[i]) : null;
      el("line", { x1: x, x2: x + 24, y1: y, y2: y, style: cs ? `stroke:${cs.stroke};stroke-width:2;stroke-dasharray:${cs.strokeDasharray}` : null }, svg);
      const t = el("text", { x: x + 30, y: y + 4, style: `fill:${ink};font-family:${getComputedStyle(src).fontFamily};font-size:11px` }, svg);
      t.textContent = name;
      x += 30 + name.length * 6.5 + 20;
    });
  }
  return { text: '<?xml version="1.0" encoding="UTF-8"?>\n' + new XMLSerializer().serializeToString(svg), width: W, height: H };
}

function svgText(host, title) {
  const b = build(host, title);
  return b ? b.text : null;
}

function pngBlob(host, title, scale = 2) {
  const b = build(host, title);
  if (!b) return Promise.resolve(null);
  return new Promise((resolve, reject) => {
    // A data: URL, not a blob: one: the page's Content-Security-Policy allows img-src 'self' data:.
    const url = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(b.text);
    const img = new Image();
    img.onload = () => {
      const c = document.createElement("canvas");
      c.width = Math.round(b.width * scale);
      c.height = Math.round(b.height * scale);
      const ctx = c.getContext("2d");
      ctx.scale(scale, scale);
      ctx.drawImage(img, 0, 0, b.width, b.height);
      c.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("the browser could not encode a PNG"))), "image/png");
    };
    img.onerror = () => reject(new Error("the browser could not draw the chart"));
    img.src = url;
  });
}

function line(host, opts) {
  if (!host) return;
  host._chart = opts;
  host._chartWidth = Math.round(host.clientWidth);
  render(host);
  if (observer && !host._observed) { observer.observe(host); host._observed = true; }
}

export const Chart = { line, compact, svgText, pngBlob };

// Also on `window` for the browser console and tests/browser (which reads a tick label with
// Chart.compact); the page's own modules import it.
window.Chart = Chart;
