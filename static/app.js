/* ampserve status page, the entry module: jobs (live via SSE, polling as a fallback), job detail
 * with charts, run comparison, experiments, the new-job form and the translate box. Plain ES
 * modules, no build step. This file only wires the views to the router, the live events and the
 * once-a-second tick; each concern lives in its own module (see README's layout section). */
import { $, toast } from "./dom.js";
import { probeReads } from "./api.js";
import * as session from "./session.js";
import * as store from "./store.js";
import * as live from "./live.js";
import * as router from "./router.js";
import * as jobs from "./view-jobs.js";
import * as job from "./view-job.js";
import * as compare from "./view-compare.js";
import * as experiments from "./view-experiments.js";
import * as newJob from "./view-new.js";
import * as translate from "./view-translate.js";

const VIEWS = { jobs, job, compare, experiments, new: newJob, translate };

/** What is on screen, for the live events: the open job, or the jobs table's rows. */
function onScreen() {
  const view = router.current();
  return {
    detail: view === "job" ? job.openId() : null,
    list: view === "jobs" ? store.listed() : [],
  };
}

/* Once a second: tick the tqdm clocks, and poll what SSE does not cover. */
function tick() {
  if (document.hidden) return;
  const v = VIEWS[router.current()];
  if (v && v.tick) v.tick(Date.now());
}

function init() {
  live.start(onScreen);
  router.start(VIEWS, live.syncStreams);
  for (const v of Object.values(VIEWS)) if (v.init) v.init();
  $("token-btn").hidden = !session.token();
  $("token-btn").addEventListener("click", async () => {
    if (await session.askAgain()) { toast("Token saved for this tab"); router.route(); }
  });
  live.setConn("idle");
  probeReads().finally(() => {
    router.route();
    setInterval(tick, 1000);
  });
}

if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
else init();
