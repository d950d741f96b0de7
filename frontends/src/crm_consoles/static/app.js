// The console's router: `#/<route>/<argument>` to a page, with loading and
// refusal states, keyboard focus moved to the page, and the top search box.
import { boot, clear, loading, problem, h } from "./ui.js";
import * as customers from "./pages/customers.js";
import * as sales from "./pages/sales.js";
import * as service from "./pages/service.js";
import * as marketing from "./pages/marketing.js";
import * as management from "./pages/management.js";

const routes = {
  search: customers.search,
  customer: customers.customer360,
  board: sales.board,
  leads: sales.leads,
  lead: sales.lead,
  deal: sales.deal,
  forecast: sales.forecast,
  tasks: sales.tasks,
  queue: service.queue,
  "at-risk": service.atRisk,
  case: service.caseView,
  members: marketing.members,
  member: marketing.member,
  rewards: marketing.rewards,
  rules: marketing.rules,
  dashboard: management.dashboard,
  "service-levels": management.serviceLevels,
};

let generation = 0;
let stopPage = null;

async function render() {
  const main = document.getElementById("main");
  const [route, ...rest] = (location.hash.replace(/^#\/?/, "") || boot.home).split("/");
  const [name, query] = route.split("?");
  const arg = rest.map(decodeURIComponent).join("/");
  const params = new URLSearchParams((location.hash.split("?")[1]) || "");
  const view = routes[name];
  const mine = ++generation;
  if (stopPage) { try { stopPage(); } catch { /* the old page is gone */ } stopPage = null; }
  for (const a of document.querySelectorAll(".sidenav a")) {
    if (a.dataset.route === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  clear(main).append(loading());
  if (!view) {
    clear(main).append(h("div", { class: "page-header" }, h("h1", {}, "Not found")), h("p", {}, "This console has no such page."));
    return;
  }
  const page = h("div", { class: "page" });
  try {
    const stop = await view(page, arg.split("?")[0], params, () => mine !== generation);
    if (mine !== generation) { if (typeof stop === "function") stop(); return; }
    stopPage = typeof stop === "function" ? stop : null;
    clear(main).append(page);
    // The first page drawn with its data: the moment the console is usable
    // (bench/consoles.py reads it with the navigation timings).
    if (!performance.getEntriesByName("crm:interactive").length) performance.mark("crm:interactive", { detail: { page: name } });
  } catch (error) {
    if (mine !== generation) return;
    clear(main).append(h("div", { class: "page-header" }, h("h1", {}, "This page cannot be shown")), problem(error));
    if (!(error && error.status)) console.error(error);
  }
  const heading = main.querySelector("h1");
  if (heading && document.activeElement === document.body) {
    heading.setAttribute("tabindex", "-1");
    heading.focus({ preventScroll: true });
  }
}

document.getElementById("topsearch").addEventListener("submit", (event) => {
  event.preventDefault();
  const q = new FormData(event.target).get("q").trim();
  location.hash = `#/search?q=${encodeURIComponent(q)}`;
});

// "/" focuses the customer search, as in most business applications.
document.addEventListener("keydown", (event) => {
  if (event.key === "/" && !/INPUT|TEXTAREA|SELECT/.test(document.activeElement.tagName)) {
    event.preventDefault();
    document.getElementById("topsearch-q").focus();
  }
});

window.addEventListener("hashchange", render);
render();
