// The status page in a real browser: Debian's headless Chromium driven by playwright-core,
// against the real `ampserve serve` binary training real (tiny) models on Tatoeba en-it.
//
//   cargo test && node tests/browser/page.test.mjs      (scripts/test.sh does both; cargo test
//   builds target/debug/ampserve for the integration tests, and this test starts that binary)
//
// Steps: two tiny jobs (fp32, and f16 starting from a loss scale that overflows) reach
// `succeeded` in the jobs table; a job started from the new-job form is followed live over SSE
// on its detail page and in the table (tqdm-style progress line), cancelled with its button and
// deleted through the confirmation dialog; the job detail shows a loss chart with one point per
// step, validation curves, sample translations and (f16) the loss scale on a log axis with every
// skipped step marked; the compare view overlays both runs with a throughput ratio; the form
// shows the API's error next to the batch-size field; the page works at 390 px without
// sideways scrolling; the job page downloads its metrics as CSV and its loss chart as SVG and
// PNG, and the compare view switches its x axis to seconds; with --api-token --protect-reads the page asks for the token once, keeps
// it for the tab and follows jobs by polling; the translate box translates a sentence, and its
// model picker names each model's kind.
// Screenshots go to target/screenshots/.
//
// Translation uses the model the server exported when the first job succeeded.
// Also: AMPSERVE_BIN (default <target>/debug/ampserve), CHROMIUM (default /usr/bin/chromium).
import { chromium } from "playwright-core";
import { spawn } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, existsSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import assert from "node:assert/strict";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const TARGET = process.env.CARGO_TARGET_DIR ? resolve(ROOT, process.env.CARGO_TARGET_DIR) : join(ROOT, "target");
const BIN = process.env.AMPSERVE_BIN || join(TARGET, "debug", "ampserve");
const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const SHOTS = join(ROOT, "target", "screenshots");
// Deadlines only keep a broken run from hanging; nothing asserts on time.
const LONG = 240_000;

const cleanup = [];
const servers = [];

function log(msg) {
  process.stdout.write(msg + "\n");
}

/** Start `ampserve serve` on a free port; resolves with its base URL once it logs it. */
function startServer(extraArgs = []) {
  const dataDir = mkdtempSync(join(tmpdir(), "ampserve-browser-"));
  cleanup.push(dataDir);
  const child = spawn(BIN, ["serve", "--data-dir", dataDir, "--bind", "127.0.0.1:0", "--devices", "cpu", ...extraArgs], {
    cwd: ROOT,
    env: { ...process.env, NO_COLOR: "1", RUST_LOG: "info" },
    stdio: ["ignore", "ignore", "pipe"],
  });
  const srv = { child, log: "", base: null };
  servers.push(srv);
  return new Promise((res, rej) => {
    const timer = setTimeout(() => rej(new Error("server did not start:\n" + srv.log)), 60_000);
    child.stderr.setEncoding("utf8");
    child.stderr.on("data", (chunk) => {
      srv.log += chunk;
      if (srv.log.length > 200_000) srv.log = srv.log.slice(-100_000);
      const m = !srv.base && srv.log.match(/listening on (http:\/\/[0-9.]+:[0-9]+)\//);
      if (m) {
        srv.base = m[1];
        clearTimeout(timer);
        res(srv);
      }
    });
    child.on("exit", (code) => {
      if (!srv.base) {
        clearTimeout(timer);
        rej(new Error(`server exited (${code}) before listening:\n${srv.log}`));
      }
    });
  });
}

async function stopServer(srv) {
  if (srv.child.exitCode !== null) return;
  const done = new Promise((r) => srv.child.once("exit", r));
  srv.child.kill("SIGINT");
  const t = setTimeout(() => srv.child.kill("SIGKILL"), 20_000);
  await done;
  clearTimeout(t);
}

async function post(base, path, body) {
  const r = await fetch(base + path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const v = await r.json();
  assert.equal(r.status, 201, JSON.stringify(v));
  return v;
}

/** A job that trains in seconds in a debug build on 2 cores: 40 steps of a 32-wide model. */
function tinyJob(name, precision) {
  return {
    config: "tiny",
    name,
    data: { max_train_pairs: 400 },
    model: { d_model: 32, layers: 1, heads: 2, d_ff: 64 },
    train: {
      precision, max_steps: 40, epochs: 1000, batch_size: 16, lr: 3e-3, warmup_steps: 10,
      valid_every: 20, valid_max_sentences: 16, valid_samples: 3,
    },
    checkpoint: { every_steps: 20, keep_last: 2 },
  };
}

let page;
let stepNo = 0;
async function step(name, fn) {
  stepNo++;
  const t0 = Date.now();
  try {
    await fn();
    log(`ok ${stepNo} - ${name} (${((Date.now() - t0) / 1000).toFixed(1)} s)`);
  } catch (e) {
    log(`not ok ${stepNo} - ${name}`);
    if (page) await page.screenshot({ path: join(SHOTS, `failed-step-${stepNo}.png`), fullPage: true }).catch(() => {});
    throw e;
  }
}

/**
 * Points the mouse at (fx, fy) of a chart, as fractions of its size, until its tooltip shows.
 * A chart redraws (a new svg) whenever metrics or validations arrive, so a single measure-then-move
 * can hit a detached svg: measure and move again until the live one answers. Returns the tip's text.
 */
async function hoverUntilTip(chart, fx, fy) {
  const deadline = Date.now() + 15000;
  for (;;) {
    const box = await page.locator(`${chart} svg`).boundingBox();
    if (box) {
      await page.mouse.move(0, 0);
      await page.mouse.move(box.x + box.width * fx, box.y + box.height * fy, { steps: 3 });
      try {
        return await page.locator(`${chart} .tip:not([hidden])`).textContent({ timeout: 1000 });
      } catch (e) {
        if (Date.now() > deadline) throw e;
      }
    } else if (Date.now() > deadline) {
      throw new Error(`${chart} has no visible svg to hover`);
    } else {
      await page.waitForTimeout(100);
    }
  }
}

/** Full-page screenshot; toasts from earlier steps are cleared unless `keepToasts`. */
async function shot(name, { keepToasts = false } = {}) {
  if (!keepToasts) await page.evaluate(() => document.getElementById("toasts").replaceChildren());
  await page.screenshot({ path: join(SHOTS, name), fullPage: true });
}

/** Click `selector` and return the file the page downloads: {name, bytes}. */
async function download(selector) {
  const [dl] = await Promise.all([page.waitForEvent("download"), page.click(selector)]);
  return { name: dl.suggestedFilename(), bytes: readFileSync(await dl.path()) };
}

async function main() {
  assert.ok(existsSync(BIN), `${BIN} is missing: run cargo test (or cargo build) first`);
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: run scripts/setup-test-deps.sh`);
  rmSync(SHOTS, { recursive: true, force: true });
  mkdirSync(SHOTS, { recursive: true });

  const srv = await startServer();
  log(`# server at ${srv.base}`);
  const a = await post(srv.base, "/api/jobs", tinyJob("tatoeba-fp32", "fp32"));
  // f16 starting from a loss scale far too high: the first steps overflow and are skipped while
  // the scaler backs off, as GradScaler runs usually begin.
  const b = await post(srv.base, "/api/jobs", { ...tinyJob("tatoeba-f16", "f16"), amp: { init_scale: 2 ** 32 } });

  const profile = mkdtempSync(join(tmpdir(), "ampserve-chromium-"));
  cleanup.push(profile);
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 900 },
    args: [
      "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-quic",
    ],
  });
  cleanup.push(() => context.close());
  page = context.pages()[0] || (await context.newPage());
  page.setDefaultTimeout(30_000);
  const problems = [];
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    // Chromium logs every non-2xx fetch as "Failed to load resource"; the page handles those.
    if (m.type() === "error" && !/Failed to load resource/.test(m.text())) problems.push(`console: ${m.text()}`);
  });

  await step("jobs table: both jobs reach succeeded", async () => {
    await page.goto(srv.base + "/");
    for (const id of [a.id, b.id]) {
      await page.locator(`#job-row-${id} .badge[data-status="succeeded"]`).waitFor({ timeout: LONG });
    }
    const row = page.locator(`#job-row-${a.id}`);
    assert.match(await row.locator(".progress-text").textContent(), /^40\/40 100% \[\d\d:\d\d<00:00, /);
    assert.match(await row.locator(".loss-cell").textContent(), /^\d+\.\d{3}$/);
    assert.equal(await row.locator(".prec-cell").textContent(), "fp32");
    assert.equal(await page.locator(`#job-row-${b.id} .prec-cell`).textContent(), "f16");
    // Finished jobs offer export and delete, not cancel.
    const labels = await row.locator(".row-actions button").allTextContents();
    assert.deepEqual(labels, ["Export", "Delete"]);
  });

  let c;
  await step("new-job form: a valid job starts and its detail page follows it live", async () => {
    await page.goto(`${srv.base}/#/new`);
    await page.locator('#f-config option[value="tiny"]').waitFor({ state: "attached" });
    await page.selectOption("#f-config", "tiny");
    await page.fill("#f-name", "long-run");
    await page.fill("#f-epochs", "100");
    await page.fill("#f-batch", "8");
    await page.fill("#f-steps", "20000");
    await page.click("#f-submit");
    await page.waitForURL(/#\/jobs\/\d+$/);
    const id = Number(page.url().split("/").pop());
    c = await (await fetch(`${srv.base}/api/jobs/${id}`)).json();
    assert.equal(c.name, "long-run");
    assert.equal(c.spec.train.batch_size, 8);
    assert.equal(c.spec.train.max_steps, 20000);
    assert.equal(c.spec.model.d_model, 128); // the rest comes from the preset
    await page.locator('#job-progress .badge[data-status="running"]').waitFor({ timeout: LONG });
    // Points arrive over SSE and extend the loss curve without a reload.
    await page.waitForFunction(() => Number(document.querySelector("#chart-loss svg")?.dataset.points) >= 4, null, { timeout: LONG });
    await page.locator('#conn[data-state="live"]').waitFor();
    await shot("03a-detail-running.png");
  });

  await step("jobs table: a running job updates live over SSE; Cancel stops it", async () => {
    await page.click("text=← Jobs");
    const row = page.locator(`#job-row-${c.id}`);
    await row.locator('.badge[data-status="running"]').waitFor({ timeout: LONG });
    await page.locator('#conn[data-state="live"]').waitFor();
    // The row follows the steps as they happen.
    const first = Number((await row.locator(".progress-text").textContent()).split("/")[0]);
    await page.waitForFunction(([id, n]) => {
      const m = document.querySelector(`#job-row-${id} .progress-text`)?.textContent.match(/^(\d+)\/20000 /);
      return m && Number(m[1]) >= n + 2;
    }, [c.id, first], { timeout: LONG });
    const text = await row.locator(".progress-text").textContent();
    assert.match(text, /^\d+\/20000 \d+% \[\d\d:\d\d<(\d+:)?\d\d:\d\d, \d+\.\d\d(it\/s|s\/it)\]$/, text);
    await shot("01-jobs-running.png");
    await row.getByRole("button", { name: `Cancel job ${c.id} (long-run)` }).click();
    await row.locator('.badge[data-status="cancelled"]').waitFor({ timeout: LONG });
    assert.deepEqual(await row.locator(".row-actions button").allTextContents(), ["Resume", "Export", "Delete"]);
  });

  await step("jobs table: Delete asks first", async () => {
    const row = page.locator(`#job-row-${c.id}`);
    await row.getByRole("button", { name: /^Delete job/ }).click();
    await page.locator("#confirm-dialog[open]").waitFor();
    await shot("02b-delete-confirm.png");
    await page.click("#confirm-no");
    assert.equal(await page.locator("#confirm-dialog[open]").count(), 0);
    assert.equal(await row.count(), 1);
    assert.equal((await fetch(`${srv.base}/api/jobs/${c.id}`)).status, 200);
    await row.getByRole("button", { name: /^Delete job/ }).click();
    await page.click("#confirm-yes");
    await row.waitFor({ state: "detached" });
    assert.equal((await fetch(`${srv.base}/api/jobs/${c.id}`)).status, 404);
    assert.equal(await page.locator("#jobs-total").textContent(), "");
    await shot("02-jobs.png", { keepToasts: true });
  });

  await step("job detail: loss chart with one point per step, validations, samples", async () => {
    await page.click(`#job-row-${a.id} a.name`);
    await page.waitForFunction(() => {
      const svg = document.querySelector("#chart-loss svg");
      return svg && Number(svg.dataset.points) === 40;
    });
    const d = await page.locator("#chart-loss path.line").getAttribute("d");
    assert.equal((d.match(/L/g) || []).length, 39, d);
    // Validation every 20 steps and at each epoch's end: one point per validation, samples
    // from the latest.
    const vals = (await (await fetch(`${srv.base}/api/jobs/${a.id}/validations`)).json()).validations;
    assert.ok(vals.length >= 2, JSON.stringify(vals));
    await page.waitForFunction((n) => Number(document.querySelector("#chart-val svg")?.dataset.points) === n, vals.length);
    assert.equal(await page.locator("#chart-bleu path.line").count(), 2); // BLEU and chrF
    assert.equal(await page.locator("#samples tbody tr").count(), 3);
    assert.equal(await page.locator("#samples-step").inputValue(), "40");
    // fp32: the loss-scale chart says scaling is off instead of drawing a flat line.
    assert.match(await page.locator("#chart-scale .nodata").textContent(), /off for this run \(fp32\)/);
    // Hover reads out values.
    assert.match(await hoverUntilTip("#chart-loss", 0.6, 0.5), /^step \d+loss: \d/);
    await shot("03-detail.png");
    await page.mouse.move(0, 0);
  });

  await step("job detail: the metrics download as CSV with a header and one line per metric row", async () => {
    await page.goto(`${srv.base}/#/jobs/${a.id}`);
    await page.waitForFunction(() => Number(document.querySelector("#chart-loss svg")?.dataset.points) === 40);
    const rows = (await (await fetch(`${srv.base}/api/jobs/${a.id}/metrics?limit=100000`)).json()).points;
    assert.equal(rows.length, 40);
    const f = await download('figure:has(#chart-loss) [data-download="csv"]');
    assert.equal(f.name, `job-${a.id}-tatoeba-fp32-metrics.csv`);
    const lines = f.bytes.toString("utf8").trimEnd().split("\n");
    assert.equal(lines[0], "step,epoch,loss,lr,loss_scale,found_inf,skipped,grad_norm,tokens_per_s,step_ms,elapsed_s");
    assert.equal(lines.length, 1 + rows.length);
    let elapsed = 0;
    rows.forEach((r, i) => {
      const cells = lines[i + 1].split(",");
      assert.equal(cells.length, 11, lines[i + 1]);
      assert.equal(Number(cells[0]), r.step);
      assert.equal(Number(cells[2]), r.loss);
      elapsed += r.step_ms;
      assert.ok(Math.abs(Number(cells[10]) - elapsed / 1000) < 0.002, lines[i + 1]);
    });
  });

  await step("job detail: the loss chart downloads as an SVG holding its curve", async () => {
    const f = await download('figure:has(#chart-loss) [data-download="svg"]');
    assert.equal(f.name, `job-${a.id}-tatoeba-fp32-loss.svg`);
    const onPage = await page.locator("#chart-loss path.line").getAttribute("d");
    const parsed = await page.evaluate((text) => {
      const doc = new DOMParser().parseFromString(text, "image/svg+xml");
      const root = doc.documentElement;
      const line = root.querySelector("path.line");
      return {
        error: doc.querySelector("parsererror")?.textContent || null,
        root: root.localName, ns: root.namespaceURI,
        d: line?.getAttribute("d"), stroke: line?.getAttribute("style") || "",
        title: root.querySelector(":scope > text")?.textContent,
      };
    }, f.bytes.toString("utf8"));
    assert.equal(parsed.error, null);
    assert.equal(parsed.root, "svg");
    assert.equal(parsed.ns, "http://www.w3.org/2000/svg");
    assert.equal(parsed.d, onPage);
    assert.equal((parsed.d.match(/L/g) || []).length, 39);
    // The page's stylesheet does not travel with the file: the curve carries its own stroke.
    assert.match(parsed.stroke, /stroke:\s*rgb\(/);
    assert.match(parsed.stroke, /fill:\s*none/);
    assert.match(parsed.title, /^Training loss · #\d+ tatoeba-fp32$/);
  });

  await step("job detail: the loss chart downloads as a PNG of the drawn chart", async () => {
    const f = await download('figure:has(#chart-loss) [data-download="png"]');
    assert.equal(f.name, `job-${a.id}-tatoeba-fp32-loss.png`);
    writeFileSync(join(SHOTS, "03d-downloaded-loss.png"), f.bytes); // to look at
    assert.deepEqual([...f.bytes.subarray(0, 8)], [0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
    assert.equal(f.bytes.toString("latin1", 12, 16), "IHDR");
    const w = f.bytes.readUInt32BE(16), h = f.bytes.readUInt32BE(20);
    const vb = (await page.locator("#chart-loss svg").getAttribute("viewBox")).split(" ").map(Number);
    assert.equal(w, 2 * vb[2]); // drawn at twice the page's size
    assert.equal(h, 2 * (vb[3] + 22)); // plus the title line
    assert.ok(f.bytes.length > 8000, `PNG is only ${f.bytes.length} bytes`);
    // Not a blank picture: the curve's colour is in it.
    const colours = await page.evaluate(async (b64) => {
      // (fetch of a data: URL is outside the page's connect-src, so decode by hand)
      const bytes = Uint8Array.from(atob(b64), (ch) => ch.charCodeAt(0));
      const img = await createImageBitmap(new Blob([bytes], { type: "image/png" }));
      const c = new OffscreenCanvas(img.width, img.height);
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const px = ctx.getImageData(0, 0, img.width, img.height).data;
      const seen = new Set();
      for (let i = 0; i < px.length; i += 4) seen.add((px[i] << 16) | (px[i + 1] << 8) | px[i + 2]);
      const line = getComputedStyle(document.querySelector("#chart-loss path.line")).stroke.match(/\d+/g).map(Number);
      return { count: seen.size, hasLine: seen.has((line[0] << 16) | (line[1] << 8) | line[2]) };
    }, f.bytes.toString("base64"));
    assert.ok(colours.count > 10, `only ${colours.count} colours`);
    assert.ok(colours.hasLine, "the curve's colour is not in the PNG");
    await shot("03c-detail-downloads.png");
  });

  await step("job detail (f16): loss scale on a log axis", async () => {
    await page.goto(`${srv.base}/#/jobs/${b.id}`);
    await page.waitForFunction(() => Number(document.querySelector("#chart-scale svg")?.dataset.points) === 40);
    assert.equal(await page.locator("#chart-scale .nodata").count(), 0);
    // Every skipped step is marked on the loss-scale chart.
    const job = await (await fetch(`${srv.base}/api/jobs/${b.id}`)).json();
    const skipped = job.metrics.skipped_steps;
    assert.ok(skipped > 0, "the f16 run should have skipped steps");
    assert.equal(await page.locator("#chart-scale path.marker").count(), skipped);
    assert.equal(await page.locator("#job-facts div", { has: page.locator("dt", { hasText: "Skipped steps" }) }).locator("dd").textContent(), String(skipped));
    assert.match(await page.locator("#chart-scale .axis-label").last().textContent(), /\(log\)/);
    // The overflow panel names the gradient tensors that overflowed, as /overflows does.
    const ov = await (await fetch(`${srv.base}/api/jobs/${b.id}/overflows`)).json();
    assert.equal(ov.overflow_steps, skipped);
    await page.waitForFunction(() => document.querySelectorAll("#overflow-tensors tbody tr").length > 0);
    assert.equal(await page.locator("#overflow-tensors tbody tr").count(), Math.min(10, ov.tensors.length));
    assert.equal(await page.locator("#overflow-tensors tbody tr").first().locator("td").first().textContent(), ov.tensors[0].tensor);
    assert.match(await page.locator("#overflow-summary").textContent(), new RegExp(`^${skipped} overflowing steps`));
    await shot("03b-detail-f16.png");
  });

  await step("job detail (f16 that collapses): the switch to bf16 is shown in the Overflows panel", async () => {
    // a test-only inf in one gradient from step 6 on collapses the scale at step 10
    const job = tinyJob("tatoeba-collapse", "f16");
    job.train.max_steps = 20;
    job.checkpoint.every_steps = 4;
    job.amp = {
      init_scale: 4, min_scale: 1, max_consecutive_skips: 3, on_scale_collapse: "bf16",
      test_inject_inf: { tensor: "decoder.layers.0.ffn.linear_2.weight", from_step: 6, count: 1000 },
    };
    const c = await post(srv.base, "/api/jobs", job);
    let view;
    for (let i = 0; i < 600; i++) {
      view = await (await fetch(`${srv.base}/api/jobs/${c.id}`)).json();
      if (["succeeded", "failed", "cancelled"].includes(view.status)) break;
      await new Promise((r) => setTimeout(r, 200));
    }
    assert.equal(view.status, "succeeded", JSON.stringify(view));
    assert.equal(view.recoveries.length, 1);
    await page.goto(`${srv.base}/#/jobs/${c.id}`);
    await page.locator("#recoveries li").first().waitFor();
    assert.equal(await page.locator("#recoveries li").count(), 1);
    assert.match(await page.locator("#recoveries li").first().textContent(), /^Step 10: the loss scale collapsed; switched to bf16 from the checkpoint at step 4\./);
    assert.match(await page.locator("#overflow-tensors tbody tr").first().locator("td").first().textContent(), /decoder\.layers\.0\.ffn\.linear_2\.weight/);
    await shot("03e-detail-recovery.png");
  });

  await step("compare: loss curves overlaid, throughput ratio", async () => {
    await page.goto(`${srv.base}/#/compare?a=${a.id}&b=${b.id}`);
    await page.waitForFunction(() => /^\d+\.\d\d×$/.test(document.querySelector("#cmp-ratio .big")?.textContent || ""));
    assert.equal(await page.locator("#chart-compare path.line").count(), 2);
    assert.equal(await page.locator("#cmp-a").inputValue(), String(a.id));
    assert.equal(await page.locator("#cmp-b").inputValue(), String(b.id));
    await shot("04-compare.png");
  });

  await step("compare: the x axis switches to seconds of summed step time", async () => {
    const rows = (await (await fetch(`${srv.base}/api/jobs/${a.id}/metrics?limit=100000`)).json()).points;
    const seconds = rows.reduce((s, r) => s + r.step_ms, 0) / 1000;
    await page.check('input[name="cmp-x"][value="time"]');
    await page.waitForFunction(() => document.querySelector("#chart-compare .axis-label")?.textContent === "time (s)");
    assert.equal(await page.locator("#chart-compare path.line").count(), 2);
    const want = await page.evaluate((v) => Chart.compact(v) + " s", seconds);
    const aria = await page.locator("#chart-compare > svg").getAttribute("aria-label");
    assert.ok(aria.includes(`latest time (s) ${want}:`), `${aria} should end run A at ${want}`);
    const ticks = await page.locator("#chart-compare text.tick").allTextContents();
    const xTicks = ticks.filter((t) => / s$/.test(t));
    assert.ok(xTicks.length >= 2, JSON.stringify(ticks));
    await shot("04b-compare-time.png");
    // The overlay downloads too, with both curves and their legend.
    const f = await download('figure:has(#chart-compare) [data-download="svg"]');
    assert.equal(f.name, `compare-${a.id}-${b.id}.svg`);
    const svg = await page.evaluate((text) => {
      const root = new DOMParser().parseFromString(text, "image/svg+xml").documentElement;
      return { lines: root.querySelectorAll("path.line").length, text: root.textContent };
    }, f.bytes.toString("utf8"));
    assert.equal(svg.lines, 2);
    assert.ok(svg.text.includes("time (s)") && svg.text.includes("A #") && svg.text.includes("B #"), svg.text);
    await page.check('input[name="cmp-x"][value="step"]');
    await page.waitForFunction(() => document.querySelector("#chart-compare .axis-label")?.textContent === "step");
    assert.ok((await page.locator("#chart-compare > svg").getAttribute("aria-label")).includes("latest step 40:"));
  });

  await step("new-job form: the API's error shows next to the field it names", async () => {
    await page.goto(`${srv.base}/#/new`);
    await page.locator('#f-config option[value="tiny"]').waitFor({ state: "attached" });
    assert.equal(await page.locator("#f-batch").inputValue(), "32"); // from the preset
    const before = (await (await fetch(srv.base + "/api/jobs")).json()).total;
    await page.fill("#f-batch", "0");
    await page.click("#f-submit");
    const err = page.locator('[id="err-train.batch_size"]');
    await page.waitForFunction(() => document.getElementById("err-train.batch_size").textContent.length > 0);
    assert.match(await err.textContent(), /out of range/);
    assert.equal(await page.locator("#f-batch").getAttribute("aria-invalid"), "true");
    assert.ok(await page.locator("#form-error").isHidden());
    const jobs = await (await fetch(srv.base + "/api/jobs")).json();
    assert.equal(jobs.total, before, "the bad form must not create a job");
    await shot("05-form-error.png");
  });

  await step("experiments: an fp32 vs f16 experiment shows both arms' curves, the table and the verdicts", async () => {
    const { train, ...base } = tinyJob("exp", "fp32");
    const { max_steps, precision, ...rest } = train;
    const x = await post(srv.base, "/api/experiments", { ...base, train: rest, arms: ["fp32", "f16"], max_steps: 12 });
    const deadline = Date.now() + LONG;
    for (;;) {
      const v = await (await fetch(`${srv.base}/api/experiments/${x.id}`)).json();
      if (v.status === "finished") break;
      assert.ok(Date.now() < deadline, `experiment never finished: ${JSON.stringify(v)}`);
      await new Promise((res) => setTimeout(res, 300));
    }
    await page.goto(`${srv.base}/#/experiments/${x.id}`);
    await page.locator("#exp-table tbody tr").nth(1).waitFor();
    assert.deepEqual(await page.locator("#exp-table tbody th").allTextContents(), ["fp32", "f16"]);
    assert.equal(await page.locator("#chart-exp-step path.line").count(), 2);
    assert.equal(await page.locator("#chart-exp-time path.line").count(), 2);
    assert.equal(await page.locator("#chart-exp-time .axis-label").first().textContent(), "time (s)");
    const verdicts = await page.locator("#exp-verdicts li").allTextContents();
    assert.match(verdicts[0], /^fp32: baseline/);
    assert.match(verdicts[1], /^f16: \d+\.\d\dx (faster|slower), BLEU [+-]\d+\.\d/);
    const speedup = await page.locator("#exp-table tbody tr").first().locator("td").nth(4).textContent();
    assert.equal(speedup, "1.00×");
    assert.equal(await page.locator('nav a[data-nav="experiments"]').getAttribute("aria-current"), "page");
    await shot("05b-experiments.png");
  });

  await step("phone width (390 px): no sideways scrolling, jobs as cards", async () => {
    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${srv.base}/#/jobs`);
    await page.locator(`#job-row-${a.id} .badge[data-status="succeeded"]`).waitFor();
    const width = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(width <= 390, `page is ${width}px wide at 390px`);
    await shot("07-phone-jobs.png");
    await page.goto(`${srv.base}/#/jobs/${b.id}`);
    await page.waitForFunction(() => Number(document.querySelector("#chart-loss svg")?.dataset.points) === 40);
    const w2 = await page.evaluate(() => document.documentElement.scrollWidth);
    assert.ok(w2 <= 390, `detail is ${w2}px wide at 390px`);
    await shot("08-phone-detail.png");
    await page.setViewportSize({ width: 1280, height: 900 });
  });

  await step("dark colour scheme", async () => {
    await page.emulateMedia({ colorScheme: "dark" });
    await page.goto(`${srv.base}/#/jobs/${b.id}`);
    await page.waitForFunction(() => Number(document.querySelector("#chart-scale svg")?.dataset.points) === 40);
    const bg = await page.evaluate(() => getComputedStyle(document.documentElement).backgroundColor);
    const [r, g, bl] = bg.match(/\d+/g).map(Number);
    assert.ok(r + g + bl < 150, `background ${bg} is not dark`);
    await shot("09-dark-detail.png");
    await page.emulateMedia({ colorScheme: "light" });
  });

  await step("API token: asked once, kept for the tab", async () => {
    const locked = await startServer(["--api-token", "browser-secret", "--protect-reads"]);
    const p2 = await context.newPage();
    try {
      await p2.goto(locked.base + "/");
      await p2.locator("#token-dialog[open]").waitFor();
      await p2.fill("#token-input", "wrong");
      await p2.click("#token-save");
      await p2.waitForFunction(() => /not accepted/.test(document.getElementById("token-error").textContent));
      await p2.fill("#token-input", "browser-secret");
      await p2.click("#token-save");
      await p2.locator("#jobs-empty").waitFor();
      assert.equal(await p2.evaluate(() => sessionStorage.getItem("ampserve.token")), "browser-secret");
      await p2.reload();
      await p2.locator("#jobs-empty").waitFor();
      assert.equal(await p2.locator("#token-dialog[open]").count(), 0);
      // Reads need the token, so EventSource (which cannot send it) is not used: the table
      // follows a job by polling.
      assert.equal(await p2.locator("#conn").getAttribute("data-state"), "polling");
      const r = await fetch(locked.base + "/api/jobs", {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer browser-secret" },
        body: JSON.stringify(tinyJob("polled", "fp32")),
      });
      assert.equal(r.status, 201);
      const polled = await r.json();
      await p2.locator(`#job-row-${polled.id} .badge[data-status="succeeded"]`).waitFor({ timeout: LONG });
      assert.match(await p2.locator(`#job-row-${polled.id} .progress-text`).textContent(), /^40\/40 100% /);
      assert.equal(await p2.evaluate(() => typeof window.EventSource), "function");
    } finally {
      await p2.close();
      await stopServer(locked);
    }
  });

  // Succeeded jobs are exported automatically: translate with the first model, then see the
  // server's validation error (too many source words) next to the text field.
  await step("translate: a sentence, with the time it took; errors next to the field", async () => {
    const deadline = Date.now() + LONG;
    for (;;) {
      const r = await fetch(srv.base + "/api/models");
      assert.equal(r.status, 200, "GET /api/models");
      if ((await r.json()).models.length > 0) break;
      assert.ok(Date.now() < deadline, "no model was exported");
      await new Promise((res) => setTimeout(res, 200));
    }
    await page.goto(`${srv.base}/#/jobs`);
    await page.goto(`${srv.base}/#/translate`);
    await page.locator("#tr-model option").first().waitFor({ state: "attached" });
    assert.ok(await page.locator("#tr-none").isHidden());
    await page.fill("#tr-text", "I love you.");
    await page.click("#tr-submit");
    await page.locator("#tr-out").waitFor();
    assert.ok((await page.locator("#tr-result").textContent()).trim().length > 0);
    assert.match(await page.locator("#tr-timing").textContent(), /\d ms on the server/);
    await shot("06-translate.png");
    await page.fill("#tr-text", Array(300).fill("word").join(" "));
    await page.click("#tr-submit");
    await page.waitForFunction(() => document.getElementById("err-text").textContent.length > 0);
    assert.match(await page.locator("#err-text").textContent(), /300 source tokens/);
    await shot("06b-translate-error.png");
  });

  await step("translate: each model in the picker names its kind, as GET /api/models gives it", async () => {
    await page.goto(`${srv.base}/#/translate`);
    await page.locator("#tr-model option").first().waitFor({ state: "attached" });
    const models = (await (await fetch(srv.base + "/api/models")).json()).models;
    const options = await page.locator("#tr-model option").evaluateAll((os) => os.map((o) => ({ id: Number(o.value), kind: o.dataset.kind, text: o.textContent })));
    assert.deepEqual(options.map((o) => o.id).sort(), models.map((m) => m.id).sort());
    for (const m of models) {
      const o = options.find((x) => x.id === m.id);
      // every model here was trained by this server (an imported Marian model reads "MarianMT (imported)")
      assert.equal(m.kind, "ampserve", JSON.stringify(m));
      assert.equal(o.kind, m.kind);
      assert.ok(o.text.startsWith(`#${m.id} ${m.name} · Transformer (trained here) · ${m.src_lang}→${m.tgt_lang} · `), o.text);
    }
  });

  assert.deepEqual(problems, [], "the page logged errors");
}

let failed = false;
try {
  await main();
  log("# all steps passed; screenshots in " + SHOTS);
} catch (e) {
  failed = true;
  console.error(e);
  for (const s of servers) console.error(`--- server log (${s.base || "not started"}) ---\n` + s.log.slice(-4000));
} finally {
  for (const c of cleanup.reverse()) {
    try {
      if (typeof c === "function") await c();
    } catch (_) {}
  }
  for (const s of servers) await stopServer(s).catch(() => {});
  for (const c of cleanup) if (typeof c === "string") rmSync(c, { recursive: true, force: true });
}
process.exit(failed ? 1 : 0);
