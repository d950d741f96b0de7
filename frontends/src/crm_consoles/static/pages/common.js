// Helpers several consoles share: contact names for ids, a reason dialog, bar and line charts (Chart.js).
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
  return chartFigure(title, summary, height, (quiet) => ({
    type: "bar",
    data: {
      labels: groups,
      datasets: series.map((se, j) => ({
        label: se.name, data: groups.map((_, i) => se.values[i] || 0),
        backgroundColor: SERIES_COLOURS[j % SERIES_COLOURS.length], maxBarThickness: 90,
      })),
    },
    options: {
      ...chartOptions(title, series.length > 1, quiet, format),
      scales: {
        x: { stacked: true, grid: { display: false }, ticks: { color: "#4e5666" } },
        y: { stacked: true, beginAtZero: true, ticks: { color: "#4e5666", precision: 0, callback: (v) => format(v) } },
      },
    },
  }));
}

/**
 * A line chart drawn by Chart.js for figures over time: `groups` are the x labels,
 * `series` [{name, values: [..per group, null where there is no figure], axis}] and
 * `axes` {id: {title, min, max, format}}, one scale per id (the first on the left, the
 * second on the right), so figures of different ranges share a chart. A null value
 * leaves a gap. Named and described like `barChart`.
 */
export function lineChart({ title, groups, series, axes, height = 280 }) {
  const shown = (se, v) => (v === null || v === undefined ? "none" : axes[se.axis].format(v));
  const summary = series.map((se) => `${se.name}: ${groups.map((g, i) => `${g} ${shown(se, se.values[i])}`).join(", ")}`).join("; ");
  const scales = { x: { offset: true, grid: { display: false }, ticks: { color: "#4e5666" } } };
  Object.entries(axes).forEach(([id, axis], i) => {
    scales[id] = {
      position: i ? "right" : "left", min: axis.min, max: axis.max, grid: { drawOnChartArea: !i },
      title: { display: true, text: axis.title, color: "#4e5666" }, ticks: { color: "#4e5666", callback: (v) => axis.format(v) },
    };
  });
  return chartFigure(title, summary, height, (quiet) => ({
    type: "line",
    data: {
      labels: groups,
      datasets: series.map((se, j) => ({
        label: se.name, data: se.values, yAxisID: se.axis, spanGaps: false, pointRadius: 4, clip: false,
        borderColor: SERIES_COLOURS[j % SERIES_COLOURS.length], backgroundColor: SERIES_COLOURS[j % SERIES_COLOURS.length],
      })),
    },
    options: { ...chartOptions(title, series.length > 1, quiet, (v, item) => shown(series[item.datasetIndex], v)), scales },
  }));
}

function chartOptions(title, legend, quiet, format) {
  return {
    responsive: true, maintainAspectRatio: false, animation: quiet ? false : { duration: 300 },
    plugins: {
      title: { display: true, text: title, color: "#1a1f2b", font: { size: 13, weight: "600" } },
      legend: { display: legend, position: "bottom" },
      tooltip: { callbacks: { label: (item) => `${item.dataset.label}: ${format(item.parsed.y, item)}` } },
    },
  };
}

/** The figure holding a chart's canvas; Chart.js draws `config(quiet)` into it once loaded. */
function chartFigure(title, summary, height, config) {
  const canvas = h("canvas", { role: "img", "aria-label": title }, summary);
  const box = h("div", { class: "chart-box" }, canvas);
  box.style.height = `${height}px`;
  const figure = h("figure", { class: "chart-figure" }, box);
  chartJs().then((Chart) => {
    const quiet = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    figure.chart = new Chart(canvas, config(quiet));
    figure.dataset.drawn = "true";
  }).catch((error) => {
    box.replaceWith(h("p", { class: "alert alert-error alert-compact", role: "alert" }, error.message));
  });
  return figure;
}

export function remember(key, value) { if (value) localStorage.setItem(key, value); return value; }
export function recall(key) { return localStorage.getItem(key) || ""; }
export { clear };
