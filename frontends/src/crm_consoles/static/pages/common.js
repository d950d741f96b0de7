// Helpers several consoles share: contact names for ids, a reason dialog, a bar chart (Chart.js).
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

export const SERIES_COLOURS = ["#1d4ed8", "#0f766e", "#b45309", "#7c3aed", "#be123c", "#4b5563"];

let library = null;

/** Chart.js (vendored under /static/vendor, MIT), loaded the first time a page draws a chart. */
function chartJs() {
  if (window.Chart) return Promise.resolve(window.Chart);
  library ||= new Promise((resolve, reject) => {
    const script = document.createElement("script");
    script.src = "/static/vendor/chart.umd.min.js";
    script.onload = () => resolve(window.Chart);
    script.onerror = () => { library = null; reject(new Error("The charting library could not be loaded.")); };
    document.head.append(script);
  });
  return library;
}

/**
 * A stacked bar chart drawn by Chart.js: `groups` are the x labels, `series`
 * [{name, values: [..per group]}]. The canvas is an image named by `title`, with the
 * figures as its fallback text (each page also shows them in a table).
 */
export function barChart({ title, groups, series, format = (v) => String(v), height = 280 }) {
  const summary = series.map((se) => `${se.name}: ${groups.map((g, i) => `${g} ${format(se.values[i] || 0)}`).join(", ")}`).join("; ");
  const canvas = h("canvas", { role: "img", "aria-label": title }, summary);
  const box = h("div", { class: "chart-box" }, canvas);
  box.style.height = `${height}px`;
  const figure = h("figure", { class: "chart-figure" }, box);
  chartJs().then((Chart) => {
    const quiet = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    const chart = new Chart(canvas, {
      type: "bar",
      data: {
        labels: groups,
        datasets: series.map((se, j) => ({
          label: se.name, data: groups.map((_, i) => se.values[i] || 0),
          backgroundColor: SERIES_COLOURS[j % SERIES_COLOURS.length], maxBarThickness: 90,
        })),
      },
      options: {
        responsive: true, maintainAspectRatio: false, animation: quiet ? false : { duration: 300 },
        plugins: {
          title: { display: true, text: title, color: "#1a1f2b", font: { size: 13, weight: "600" } },
          legend: { display: series.length > 1, position: "bottom" },
          tooltip: { callbacks: { label: (item) => `${item.dataset.label}: ${format(item.parsed.y)}` } },
        },
        scales: {
          x: { stacked: true, grid: { display: false }, ticks: { color: "#4e5666" } },
          y: { stacked: true, beginAtZero: true, ticks: { color: "#4e5666", precision: 0, callback: (v) => format(v) } },
        },
      },
    });
    figure.dataset.drawn = "true";
    figure.chart = chart;
  }).catch((error) => {
    box.replaceWith(h("p", { class: "alert alert-error alert-compact", role: "alert" }, error.message));
  });
  return figure;
}

export function remember(key, value) { if (value) localStorage.setItem(key, value); return value; }
export function recall(key) { return localStorage.getItem(key) || ""; }
export { clear };
