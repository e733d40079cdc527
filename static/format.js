/* Number, size, duration and time formatting for the page (`fmt.num`, `fmt.scale`, ...), in one
 * place so the jobs table, the job page, compare and experiments print values the same way. */

export const fmt = {
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
