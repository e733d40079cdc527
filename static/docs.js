// Renders /openapi.json: every path with its operations, parameters, request body and
// responses, then every component schema. No framework, no CDN; text only (no innerHTML).
"use strict";

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function schemaName(s) {
  if (!s) return "";
  if (s.$ref) return s.$ref.split("/").pop();
  if (s.type === "array") return schemaName(s.items) + "[]";
  if (s.oneOf) return s.oneOf.map(schemaName).join(" | ");
  return Array.isArray(s.type) ? s.type.join(" | ") : (s.type || "object");
}

function bodyLine(content) {
  if (!content) return "";
  return Object.entries(content)
    .map(([type, c]) => type + (c.schema ? " " + schemaName(c.schema) : ""))
    .join(", ");
}

function renderOp(path, method, op) {
  const div = el("div", undefined, "op");
  const head = el("div");
  head.append(el("span", method, "method"), el("code", path));
  if (op.summary || op.description) head.append(" — " + (op.summary || op.description));
  div.append(head);
  if (op.parameters && op.parameters.length) {
    const t = el("table");
    for (const p of op.parameters) {
      const r = el("tr");
      r.append(el("td", p.name), el("td", p.in), el("td", schemaName(p.schema)),
               el("td", p.required ? "required" : ""), el("td", p.description || ""));
      t.append(r);
    }
    div.append(t);
  }
  if (op.requestBody) div.append(el("div", "body: " + bodyLine(op.requestBody.content)));
  for (const [code, r] of Object.entries(op.responses || {})) {
    div.append(el("div", code + " " + (r.description || "") + (r.content ? " — " + bodyLine(r.content) : "")));
  }
  return div;
}

async function main() {
  const spec = await (await fetch("/openapi.json")).json();
  const paths = document.getElementById("paths");
  paths.textContent = "";
  for (const [path, item] of Object.entries(spec.paths || {})) {
    for (const [method, op] of Object.entries(item)) paths.append(renderOp(path, method, op));
  }
  const schemas = document.getElementById("schemas");
  for (const [name, s] of Object.entries((spec.components || {}).schemas || {})) {
    schemas.append(el("h3", name), el("pre", JSON.stringify(s, null, 2)));
  }
}

main().catch((e) => { document.getElementById("paths").textContent = "failed: " + e; });
