// Helpers several consoles share: contact names for ids, a reason dialog, an SVG bar chart.
import { api, h, clear } from "../ui.js";

const names = new Map();

/** Display names of contacts by id (GetContact, cached for the page's life). */
export async function contactNames(ids) {
  const wanted = [...new Set(ids.filter((id) => id && !names.has(id)))].slice(0, 60);
  await Promise.all(wanted.map(async (id) => {
    try { names.set(id, (await api("contacts", `contacts/${encodeURIComponent(id)}`)).name); }
    catch { names.set(id, ""); }
  }));
  return (id) => names.get(id) || "";
}

/** Asks for a short text in a modal dialog; resolves to the text or null when cancelled. */
export function ask(title, fieldLabel, { placeholder = "", required = true } = {}) {
  return new Promise((resolve) => {
    const input = h("input", { id: "ask-input", name: "value", required, placeholder, maxlength: "500" });
    const cancel = h("button", { type: "button", class: "button button-quiet" }, "Cancel");
    const form = h("form", { method: "dialog", class: "form" },
      h("h2", {}, title), h("div", { class: "field" }, h("label", { for: "ask-input" }, fieldLabel), input),
      h("div", { class: "buttons" }, cancel, h("button", { type: "submit", class: "button button-primary", value: "ok" }, "Confirm")));
    const dialog = h("dialog", { class: "dialog", "aria-label": title }, form);
    document.body.append(dialog);
    let answered = null;
    form.addEventListener("submit", () => { answered = input.value.trim() || null; });
    cancel.addEventListener("click", () => dialog.close());
    dialog.addEventListener("close", () => { dialog.remove(); resolve(answered); });
    dialog.showModal();
    input.focus();
  });
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

export const SERIES_COLOURS = ["#1d4ed8", "#0f766e", "#b45309", "#7c3aed", "#be123c", "#4b5563"];

/**
 * A stacked bar chart: `groups` are the x labels, `series` [{name, values: [..per group]}].
 * Drawn as SVG with a title, axis ticks, a legend and a text alternative.
 */
export function barChart({ title, groups, series, format = (v) => String(v), height = 260 }) {
  const width = Math.max(720, 80 + groups.length * 70);
  const pad = { l: 70, r: 16, t: 16, b: 40 };
  const totals = groups.map((_, i) => series.reduce((sum, se) => sum + (se.values[i] || 0), 0));
  const max = Math.max(1, ...totals);
  const y = (v) => pad.t + (height - pad.t - pad.b) * (1 - v / max);
  const band = (width - pad.l - pad.r) / Math.max(1, groups.length);
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img", "aria-label": title });
  svg.append(s("title", {}, title));
  for (let k = 0; k <= 4; k++) {
    const v = (max * k) / 4;
    svg.append(s("line", { x1: pad.l, x2: width - pad.r, y1: y(v), y2: y(v), class: "grid-line" }),
      s("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end", class: "axis" }, format(v)));
  }
  groups.forEach((g, i) => {
    let base = 0;
    const barWidth = Math.min(band * 0.7, 90);
    const x = pad.l + i * band + (band - barWidth) / 2;
    series.forEach((se, j) => {
      const v = se.values[i] || 0;
      if (v > 0) {
        const rect = s("rect", { x, width: barWidth, y: y(base + v), height: y(base) - y(base + v), fill: SERIES_COLOURS[j % SERIES_COLOURS.length] });
        rect.append(s("title", {}, `${g} · ${se.name}: ${format(v)}`));
        svg.append(rect);
      }
      base += v;
    });
    svg.append(s("text", { x: x + barWidth / 2, y: height - pad.b + 16, "text-anchor": "middle", class: "axis" }, g));
  });
  const legend = h("ul", { class: "legend" }, series.map((se, j) => h("li", {}, h("span", { class: `swatch swatch-${j % SERIES_COLOURS.length}`, "aria-hidden": "true" }), se.name)));
  return h("figure", { class: "chart-figure" }, svg, legend);
}

export function remember(key, value) { if (value) localStorage.setItem(key, value); return value; }
export function recall(key) { return localStorage.getItem(key) || ""; }
export { clear };
