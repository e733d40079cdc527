/* The nodes panel under the jobs table: the ampserve processes sharing this database
 * (GET /api/nodes), their devices, how long ago each last heartbeat came, and the jobs each
 * runs now. Shown once there is more than one node, or a job ran on another node. */
import { $, h } from "./dom.js";
import { api } from "./api.js";

let nodes = [];

/** The node list as last fetched. */
export function list() {
  return nodes;
}

function ago(ms) {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 60 ? `${s} s ago` : `${Math.round(s / 60)} min ago`;
}

function render() {
  const body = $("nodes-body");
  if (!body) return;
  $("nodes-card").hidden = nodes.length < 2;
  body.replaceChildren(...nodes.map((n) => h("tr", { id: "node-row-" + n.id, dataset: { id: n.id } },
    h("td", { class: n.alive ? "" : "dead" }, n.advertise_url ? h("a", { href: n.advertise_url, text: n.id }) : n.id,
      n.this_node ? h("span", { class: "sub", text: " (this node)" }) : null),
    h("td", { text: n.host }),
    h("td", { text: n.devices.join(", ") }),
    h("td", { class: n.alive ? "" : "dead", text: n.alive ? ago(n.last_heartbeat_at) : `lost (${ago(n.last_heartbeat_at)})` }),
    h("td", {}, ...(n.jobs.length ? n.jobs.flatMap((id, i) => [i ? ", " : "", h("a", { href: `#/jobs/${id}`, text: "#" + id })]) : ["–"])))));
}

/** Refetch (with the jobs list); a server without the route (older) shows nothing. */
export async function refresh() {
  try {
    nodes = (await api("/api/nodes")).nodes;
  } catch {
    nodes = [];
  }
  render();
}
