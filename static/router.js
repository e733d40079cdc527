/* The hash router: `#/jobs`, `#/jobs/<id>`, `#/compare?a=&b=`, `#/experiments[/<id>]`, `#/new`,
 * `#/translate`. It shows one view's section, marks its nav link, sets the title, and calls the
 * view's `enter(route)` (and `leave()` on the others). The current view's name is `current()`. */
import { $ } from "./dom.js";

const NAMES = ["jobs", "job", "compare", "experiments", "new", "translate"];
let view = "";
let views = {};
let after = () => {};

export const current = () => view;

/** `#/jobs/3?x=1` -> {view: "job", id: 3, parts: ["jobs", "3"], params}. */
export function parse(hash) {
  const [path, query] = (hash || "#/jobs").replace(/^#\/?/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query || "");
  let name = parts[0] || "jobs";
  if (!NAMES.includes(name) || name === "job") name = "jobs";
  const id = name === "jobs" && parts[1] ? Number(parts[1]) : null;
  if (id) name = "job";
  return { view: name, id, parts, params };
}

/** `viewsByName`: {jobs: {enter, leave?}, job: ...}; `afterRoute` runs after every enter. */
export function start(viewsByName, afterRoute) {
  views = viewsByName;
  after = afterRoute;
  window.addEventListener("hashchange", route);
}

export function route() {
  const r = parse(location.hash);
  const prev = view;
  view = r.view;
  for (const [name, v] of Object.entries(views)) if (name !== view && v.leave) v.leave();
  for (const v of NAMES) $("view-" + v).hidden = v !== view;
  const navKey = view === "job" ? "jobs" : view;
  document.querySelectorAll("nav a").forEach((a) => {
    if (a.dataset.nav === navKey) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  });
  document.title = { jobs: "Jobs", job: `Job ${r.id}`, compare: "Compare", experiments: "Experiments", new: "New job", translate: "Translate" }[view] + " · ampserve";
  if (prev && prev !== view) $("main").focus({ preventScroll: true });
  views[view].enter(r);
  after();
}
