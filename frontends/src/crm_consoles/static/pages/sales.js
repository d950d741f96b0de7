// The sales console: pipeline board, lead inbox, lead and deal pages, forecast, tasks.
import {
  api, boot, h, clear, problem, empty, section, table, field, submitter, toast, customerLink,
  money, when, label, statusBadge, pageHeader, requestId, rememberWrite, today, duration, may,
  liveRefresh,
} from "../ui.js";
import { contactNames, ask, barChart, remember, recall } from "./common.js";

async function allDeals(pipelineId) {
  const deals = [];
  let token = "";
  for (let pageNo = 0; pageNo < 5; pageNo++) {
    const reply = await api("pipeline", "opportunities", { query: { pipeline_id: pipelineId, page_size: 200, page_token: token } });
    deals.push(...reply.opportunities);
    token = reply.next_page_token;
    if (!token) break;
  }
  return deals;
}

async function choosePipeline(params) {
  const { pipelines } = await api("pipeline", "pipelines");
  const wanted = params.get("pipeline") || recall("crm.pipeline");
  const chosen = pipelines.find((p) => p.id === wanted) || pipelines[0] || null;
  if (chosen) remember("crm.pipeline", chosen.id);
  return { pipelines, chosen };
}

function pipelinePicker(pipelines, chosen, route) {
  if (pipelines.length < 2) return null;
  const select = h("select", {}, pipelines.map((p) => h("option", { value: p.id, selected: p.id === chosen.id }, p.name)));
  select.addEventListener("change", () => { location.hash = `#/${route}?pipeline=${encodeURIComponent(select.value)}`; });
  return h("div", { class: "toolbar" }, field("Pipeline", select));
}

function sums(deals) {
  const by = {};
  for (const d of deals) by[d.amount.currency] = (by[d.amount.currency] || 0) + Number(d.amount.amount);
  return Object.entries(by).map(([currency, amount]) => money({ amount, currency })).join(" + ") || "—";
}

// -- the board -------------------------------------------------------------------------

export async function board(page, _arg, params) {
  const { pipelines, chosen } = await choosePipeline(params);
  page.append(pageHeader("Pipeline board", h("p", { class: "muted", id: "board-help" },
    "Drag a deal to another stage, or focus it and press ← or → to move it; Enter opens it.")));
  if (!chosen) { page.append(empty("No pipeline is defined yet; an administrator defines the pipelines.")); return; }
  const picker = pipelinePicker(pipelines, chosen, "board");
  if (picker) page.append(picker);
  const deals = await allDeals(chosen.id);
  let nameOf = await contactNames(deals.map((d) => d.customer_id));
  const stages = chosen.stages.filter((s) => !s.retired);
  const columns = new Map();
  const boardEl = h("div", { class: "board", role: "group", "aria-label": `Stages of ${chosen.name}` });
  page.append(boardEl);

  function header(stage) {
    const inStage = deals.filter((d) => d.stage_id === stage.stage_id);
    return h("div", { class: "column-head" }, h("h2", {}, stage.name), h("span", { class: "muted" }, `${inStage.length} · ${sums(inStage)} · ${stage.probability}%`));
  }

  function card(deal) {
    const el = h("article", {
      class: `deal-card deal-${deal.status}`, tabindex: "0", draggable: "true", role: "listitem",
      "aria-describedby": "board-help", "aria-label": `${deal.name}, ${money(deal.amount)}, ${label(deal.status)}`,
      dataset: { id: deal.id },
    },
    h("a", { href: `#/deal/${encodeURIComponent(deal.id)}`, class: "deal-name", tabindex: "-1" }, deal.name),
    h("div", { class: "deal-amount" }, money(deal.amount)),
    h("div", { class: "deal-meta" }, customerLink(deal.customer_id, nameOf(deal.customer_id) || "Customer")),
    h("div", { class: "deal-meta muted" }, `close ${when(deal.expected_close_date, { time: false })} · ${deal.owner}`),
    deal.status !== "open" ? statusBadge(deal.status) : null);
    el.addEventListener("dragstart", (e) => { e.dataTransfer.setData("text/plain", deal.id); e.dataTransfer.effectAllowed = "move"; el.classList.add("dragging"); });
    el.addEventListener("dragend", () => el.classList.remove("dragging"));
    el.addEventListener("keydown", (e) => {
      const i = stages.findIndex((s) => s.stage_id === currentStage(deal));
      if (e.key === "ArrowRight" && i < stages.length - 1) { e.preventDefault(); move(deal, stages[i + 1]); }
      else if (e.key === "ArrowLeft" && i > 0) { e.preventDefault(); move(deal, stages[i - 1]); }
      else if (e.key === "Enter") { location.hash = `#/deal/${encodeURIComponent(deal.id)}`; }
    });
    return el;
  }

  const placed = new Map(); // deal id -> stage id shown
  const currentStage = (deal) => placed.get(deal.id) || deal.stage_id;

  for (const stage of stages) {
    const list = h("div", { class: "column-cards", role: "list", "aria-label": `Deals in ${stage.name}` });
    const col = h("section", { class: `column column-${stage.category}`, "aria-label": stage.name, dataset: { stage: stage.stage_id } }, header(stage), h("div", { class: "column-alert" }), list);
    col.addEventListener("dragover", (e) => { e.preventDefault(); col.classList.add("drop-target"); });
    col.addEventListener("dragleave", () => col.classList.remove("drop-target"));
    col.addEventListener("drop", (e) => {
      e.preventDefault();
      col.classList.remove("drop-target");
      const deal = deals.find((d) => d.id === e.dataTransfer.getData("text/plain"));
      if (deal) move(deal, stage);
    });
    columns.set(stage.stage_id, { col, list, stage });
    boardEl.append(col);
  }
  /** Puts every deal's card in its column (again, after a change made elsewhere). */
  function fill() {
    for (const { col, list, stage } of columns.values()) {
      clear(list);
      col.querySelector(".column-head").replaceWith(header(stage));
    }
    for (const deal of deals) {
      const target = columns.get(deal.stage_id);
      if (target) target.list.append(card(deal));
    }
    for (const { list } of columns.values()) if (!list.children.length) list.append(h("p", { class: "empty" }, "No deals"));
  }
  fill();

  async function move(deal, stage) {
    const from = columns.get(currentStage(deal));
    const to = columns.get(stage.stage_id);
    if (!to || from === to) return;
    const el = boardEl.querySelector(`[data-id="${CSS.escape(deal.id)}"]`);
    const next = el.nextSibling;
    for (const c of columns.values()) clear(c.col.querySelector(".column-alert"));
    to.list.querySelector(".empty")?.remove();
    to.list.prepend(el);
    el.classList.add("moving");
    el.setAttribute("aria-busy", "true");
    el.focus();
    const write = { method: "POST", headers: { "if-match": String(deal.version), "idempotency-key": requestId() } };
    try {
      let reply;
      if (stage.category === "closed_won") {
        reply = await api("pipeline", `opportunities/${encodeURIComponent(deal.id)}/win`, { ...write, body: {} });
      } else if (stage.category === "closed_lost") {
        const reason = await ask(`Why was “${deal.name}” lost?`, "Reason", { placeholder: "e.g. chose a competitor" });
        if (!reason) throw Object.assign(new Error("Not moved: a lost deal needs a reason."), { status: 0, cancelled: true });
        reply = await api("pipeline", `opportunities/${encodeURIComponent(deal.id)}/lose`, { ...write, body: { reason } });
      } else {
        reply = await api("pipeline", `opportunities/${encodeURIComponent(deal.id)}/stage`, { ...write, body: { stage_id: stage.stage_id } });
      }
      Object.assign(deal, reply.opportunity);
      placed.set(deal.id, deal.stage_id);
      rememberWrite(deal.customer_id, "pipeline", reply.position);
      const fresh = card(deal);
      el.replaceWith(fresh);
      fresh.focus();
      for (const c of columns.values()) {
        c.col.querySelector(".column-head").replaceWith(header(c.stage));
        if (!c.list.querySelector(".deal-card") && !c.list.querySelector(".empty")) c.list.append(h("p", { class: "empty" }, "No deals"));
      }
      toast(`${deal.name} is now in ${stage.name}`);
    } catch (error) {
      // The card goes back where it was, and the refusal is shown where it happened.
      from.list.insertBefore(el, next && next.parentNode === from.list ? next : null);
      el.classList.remove("moving");
      el.removeAttribute("aria-busy");
      el.focus();
      if (!error.cancelled) {
        const alert = problem(error, { compact: true });
        alert.prepend(h("span", { class: "alert-context" }, `${deal.name} was not moved to ${stage.name}. `));
        from.col.querySelector(".column-alert").append(alert);
      }
    } finally {
      el.classList.remove("moving");
      el.removeAttribute("aria-busy");
    }
  }
  // Live: when the console says deals of this pipeline changed, the board reads
  // them again and redraws the cards, unless nobody else's change is among them
  // (this board's own moves are already drawn) or someone is moving a card.
  async function refresh() {
    const fresh = await allDeals(chosen.id);
    const shown = new Map(deals.map((d) => [d.id, d.version]));
    if (fresh.length === shown.size && fresh.every((d) => shown.get(d.id) === d.version)) return;
    nameOf = await contactNames(fresh.map((d) => d.customer_id));
    const focused = document.activeElement && document.activeElement.closest && document.activeElement.closest(".deal-card");
    deals.splice(0, deals.length, ...fresh);
    placed.clear();
    fill();
    if (focused) boardEl.querySelector(`[data-id="${CSS.escape(focused.dataset.id)}"]`)?.focus();
  }
  const busy = () => Boolean(boardEl.querySelector(".moving, .dragging") || document.querySelector("dialog"));
  const updates = liveRefresh("board", chosen.id, refresh, busy);
  page.querySelector(".page-header").append(h("div", { class: "header-meta" }, updates.badge));
  return updates.stop;
}

// -- leads -----------------------------------------------------------------------------

const LEAD_SOURCES = ["web", "email", "phone", "referral", "event", "partner", "advertising", "social", "other"];
const LEAD_STATUSES = ["new", "qualified", "disqualified", "converted"];
const LEADS_PAGE = 25;

export async function leads(page, _arg, params) {
  const status = params.has("status") ? params.get("status") : "new";
  const token = params.get("page") || "";
  page.append(pageHeader("Lead inbox"));
  const filter = h("form", { class: "toolbar" },
    field("Status", h("select", { name: "status" }, h("option", { value: "", selected: !status }, "every lead"),
      LEAD_STATUSES.map((s) => h("option", { value: s, selected: s === status }, label(s))))),
    h("button", { class: "button", type: "submit" }, "Show"));
  filter.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/leads?${new URLSearchParams(new FormData(filter))}`; });
  const openId = h("input", { name: "id", required: true, placeholder: "lead id" });
  const opener = h("form", { class: "inline-form" }, field("Open a lead", openId), h("button", { class: "button", type: "submit" }, "Open"));
  opener.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/lead/${encodeURIComponent(openId.value.trim())}`; });
  const reply = await api("pipeline", "leads", { query: { status, page_size: LEADS_PAGE, page_token: token } });
  const more = new URLSearchParams({ status, page: reply.next_page_token });
  const paging = h("p", { class: "buttons" },
    token ? h("a", { class: "button button-quiet", href: `#/leads?${new URLSearchParams({ status })}` }, "First page") : null,
    reply.next_page_token ? h("a", { class: "button", href: `#/leads?${more}` }, "Next page") : null);
  const title = `${status ? label(status).replace(/^./, (c) => c.toUpperCase()) : "All"} leads (${reply.total_size})`;
  page.append(section(title, filter, opener, reply.leads.length
    ? table(["Lead", "Company", "Source", "Status", "Score", "Owner", "Created"], reply.leads.map((l) => [
      h("a", { href: `#/lead/${encodeURIComponent(l.id)}` }, `${l.given_name} ${l.family_name}`.trim()), l.company_name || "—", label(l.source),
      statusBadge(l.status), l.score ?? "—", l.owner, when(l.created_at)]), { caption: "Leads, oldest first" })
    : empty(status ? `No ${label(status)} leads.` : "No leads yet."), paging));
  if (may("pipeline.CreateLead")) page.append(section("New lead", newLeadForm()));
}

function newLeadForm() {
  const input = (name, attrs = {}) => h("input", { name, ...attrs });
  const form = h("form", { class: "form form-grid" },
    field("Given name", input("given_name")), field("Family name", input("family_name", { required: true })),
    field("Company", input("company_name")), field("Email", input("email", { type: "email" })), field("Phone", input("phone", { type: "tel" })),
    field("Source", h("select", { name: "source" }, LEAD_SOURCES.map((s) => h("option", { value: s }, label(s))))),
    field("Campaign", input("campaign")), field("Owner", input("owner", { value: boot.user.subject, required: true })),
    h("div", { class: "buttons" }, h("button", { class: "button button-primary", type: "submit" }, "Create lead")));
  return submitter(form, async (data) => {
    const body = Object.fromEntries([...data.entries()].filter(([, v]) => v !== ""));
    const reply = await api("pipeline", "leads", { method: "POST", headers: { "idempotency-key": requestId() }, body });
    toast("Lead created");
    location.hash = `#/lead/${encodeURIComponent(reply.id)}`;
  });
}

export async function lead(page, id) {
  const l = await api("pipeline", `leads/${encodeURIComponent(id)}`);
  page.append(pageHeader(`${l.given_name} ${l.family_name}`.trim(), h("div", { class: "header-meta" }, statusBadge(l.status), l.company_name ? ` · ${l.company_name}` : "")));
  page.append(section("Lead", h("dl", { class: "facts" },
    [["Email", l.email], ["Phone", l.phone], ["Source", label(l.source)], ["Campaign", l.campaign], ["Owner", l.owner], ["Score", l.score ?? "not qualified"], ["Created", when(l.created_at)],
      ["Disqualified because", l.disqualify_reason], ["Converted", l.converted_at ? when(l.converted_at) : ""]]
      .filter(([, v]) => v !== "" && v !== null && v !== undefined).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))));
  if (l.status === "converted") {
    page.append(section("Became", h("ul", { class: "plain" },
      l.person_id ? h("li", {}, "Person: ", customerLink(l.person_id, `${l.given_name} ${l.family_name}`)) : null,
      l.company_id ? h("li", {}, "Company: ", customerLink(l.company_id, l.company_name)) : null,
      l.opportunity_id ? h("li", {}, "Deal: ", h("a", { href: `#/deal/${encodeURIComponent(l.opportunity_id)}` }, "open the deal")) : null)));
    return;
  }
  const write = () => ({ method: "POST", headers: { "if-match": String(l.version), "idempotency-key": requestId() } });
  const reload = () => window.dispatchEvent(new HashChangeEvent("hashchange"));
  if (l.status === "new" || l.status === "qualified") {
    const score = h("input", { name: "score", type: "number", min: "0", max: "100", required: true, value: l.score ?? 50 });
    const qualify = h("form", { class: "inline-form" }, field("Score (0–100)", score), h("button", { class: "button button-primary", type: "submit" }, l.status === "new" ? "Qualify" : "Re-score"));
    submitter(qualify, async (data) => {
      await api("pipeline", `leads/${encodeURIComponent(l.id)}/qualify`, { ...write(), body: { score: Number(data.get("score")) } });
      toast("Lead qualified");
      reload();
    });
    const reason = h("input", { name: "reason", required: true, placeholder: "e.g. no budget" });
    const disqualify = h("form", { class: "inline-form" }, field("Reason", reason), h("button", { class: "button button-danger", type: "submit" }, "Disqualify"));
    submitter(disqualify, async (data) => {
      await api("pipeline", `leads/${encodeURIComponent(l.id)}/disqualify`, { ...write(), body: { reason: data.get("reason") } });
      toast("Lead disqualified");
      reload();
    });
    page.append(h("div", { class: "grid" }, section("Qualify", qualify), section("Disqualify", disqualify)));
  }
  if (l.status === "qualified" || l.status === "new") {
    let pipelines = [];
    try { pipelines = (await api("pipeline", "pipelines")).pipelines; } catch (error) { page.append(section("Convert", problem(error))); return; }
    const form = h("form", { class: "form form-grid", "aria-label": "Convert the lead" },
      field("Pipeline", h("select", { name: "pipeline_id", required: true }, pipelines.map((p) => h("option", { value: p.id, selected: p.id === recall("crm.pipeline") }, p.name)))),
      field("Deal name", h("input", { name: "opportunity_name", value: `${l.company_name || l.family_name} deal` })),
      field("Amount", h("input", { name: "amount", required: true, inputmode: "decimal", pattern: "\\d+(\\.\\d{1,4})?", placeholder: "1200.00" })),
      field("Currency", h("input", { name: "currency", required: true, value: "EUR", maxlength: "3", pattern: "[A-Z]{3}" })),
      field("Expected close", h("input", { name: "expected_close_date", type: "date", required: true, value: today(30) })),
      h("div", { class: "field field-check" }, h("input", { type: "checkbox", name: "create_company", id: "create-company", checked: Boolean(l.company_name) }), h("label", { for: "create-company" }, "Register the company too")),
      h("div", { class: "buttons" }, h("button", { class: "button button-primary", type: "submit" }, "Convert to a deal")));
    submitter(form, async (data) => {
      const reply = await api("pipeline", `leads/${encodeURIComponent(l.id)}/convert`, { ...write(), body: {
        pipeline_id: data.get("pipeline_id"), opportunity_name: data.get("opportunity_name"),
        amount: { amount: data.get("amount"), currency: data.get("currency") },
        expected_close_date: data.get("expected_close_date"), create_company: data.get("create_company") === "on", owner: boot.user.subject,
      } });
      toast("Lead converted");
      location.hash = `#/deal/${encodeURIComponent(reply.opportunity_id)}`;
    });
    page.append(section("Convert", l.status === "new" ? h("p", { class: "muted" }, "Only a qualified lead converts; the API says so if you try.") : null, form));
  }
}

// -- the deal page ----------------------------------------------------------------------

export async function deal(page, id) {
  const d = await api("pipeline", `opportunities/${encodeURIComponent(id)}`);
  const [pipeline, nameOf] = await Promise.all([
    api("pipeline", `pipelines/${encodeURIComponent(d.pipeline_id)}`),
    contactNames([d.customer_id, d.person_id, d.company_id]),
  ]);
  const stageName = (sid) => (pipeline.stages.find((s) => s.stage_id === sid) || { name: sid }).name;
  const reload = () => window.dispatchEvent(new HashChangeEvent("hashchange"));
  const write = () => ({ method: "POST", headers: { "if-match": String(d.version), "idempotency-key": requestId() } });
  const done = (reply, text) => { rememberWrite(d.customer_id, "pipeline", reply.position); toast(text); reload(); };

  page.append(pageHeader(d.name, h("div", { class: "header-meta" }, statusBadge(d.status), ` · ${stageName(d.stage_id)} · ${pipeline.name}`)));
  page.append(h("div", { class: "grid" },
    section("Deal", h("dl", { class: "facts" }, [
      ["Customer", customerLink(d.customer_id, nameOf(d.customer_id))],
      ["Person", d.person_id && d.person_id !== d.customer_id ? customerLink(d.person_id, nameOf(d.person_id)) : ""],
      ["Company", d.company_id && d.company_id !== d.customer_id ? customerLink(d.company_id, nameOf(d.company_id)) : ""],
      ["Amount", money(d.amount)], ["Expected close", when(d.expected_close_date, { time: false })], ["Owner", d.owner],
      ["Kind", label(d.kind)], ["Opened", when(d.opened_at)], ["Closed", d.closed_at ? when(d.closed_at) : ""], ["Lost because", d.lost_reason],
      ["From lead", d.lead_id ? h("a", { href: `#/lead/${encodeURIComponent(d.lead_id)}` }, "open the lead") : ""],
    ].filter(([, v]) => v).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
    section("Change", dealActions(d, pipeline, write, done))));

  page.append(section("Line items", lineItems(d, write, done)));
  page.append(section("History", table(["Stage", "Entered", "Left", "Time in stage", ""], d.history.map((v) => [
    stageName(v.stage_id), when(v.entered_at), v.left_at ? when(v.left_at) : "now",
    duration(((v.left_at ? new Date(v.left_at) : new Date()) - new Date(v.entered_at)) / 1000),
    v.regression ? h("span", { class: "badge badge-regression" }, "moved back") : "",
  ]), { caption: "Stage history" })));
  if (may("pipeline.ScheduleActivity")) page.append(section("Schedule a follow-up", followUpForm(d)));
}

function dealActions(d, pipeline, write, done) {
  const box = h("div", { class: "stack" });
  if (d.status === "open") {
    const open = pipeline.stages.filter((s) => !s.retired && !s.category.startsWith("closed"));
    const stage = h("select", { name: "stage_id" }, open.map((s) => h("option", { value: s.stage_id, selected: s.stage_id === d.stage_id }, s.name)));
    const move = h("form", { class: "inline-form" }, field("Stage", stage), h("button", { class: "button", type: "submit" }, "Move"));
    submitter(move, async (data) => done(await api("pipeline", `opportunities/${encodeURIComponent(d.id)}/stage`, { ...write(), body: { stage_id: data.get("stage_id") } }), "Deal moved"));
    const win = h("form", { class: "inline-form" }, h("button", { class: "button button-primary", type: "submit" }, "Mark as won"));
    submitter(win, async () => done(await api("pipeline", `opportunities/${encodeURIComponent(d.id)}/win`, { ...write(), body: {} }), "Deal won"));
    const lose = h("form", { class: "inline-form" }, field("Reason", h("input", { name: "reason", required: true })), h("button", { class: "button button-danger", type: "submit" }, "Mark as lost"));
    submitter(lose, async (data) => done(await api("pipeline", `opportunities/${encodeURIComponent(d.id)}/lose`, { ...write(), body: { reason: data.get("reason") } }), "Deal lost"));
    const close = h("form", { class: "inline-form" }, field("Expected close", h("input", { name: "expected_close_date", type: "date", required: true, value: d.expected_close_date })), h("button", { class: "button", type: "submit" }, "Change date"));
    submitter(close, async (data) => done(await api("pipeline", `opportunities/${encodeURIComponent(d.id)}/expected-close-date`, { ...write(), body: { expected_close_date: data.get("expected_close_date") } }), "Close date changed"));
    box.append(move, win, lose, close);
  } else {
    const reopen = h("form", { class: "inline-form" }, h("button", { class: "button", type: "submit" }, "Reopen the deal"));
    submitter(reopen, async () => done(await api("pipeline", `opportunities/${encodeURIComponent(d.id)}/reopen`, { ...write(), body: {} }), "Deal reopened"));
    box.append(h("p", { class: "muted" }, `This deal is ${d.status}; reopen it to change it.`), reopen);
  }
  return box;
}

function lineItems(d, write, done) {
  const body = h("tbody");
  const row = (li = {}) => {
    const cell = (name, attrs) => h("td", {}, h("input", { name, "aria-label": label(name), value: li[name] ?? "", ...attrs }));
    const remove = h("button", { type: "button", class: "button button-quiet", "aria-label": "Remove this line" }, "✕");
    const tr = h("tr", {}, cell("product_id", { required: true, size: "10" }), cell("product_name", { size: "16" }), cell("quantity", { required: true, size: "5", inputmode: "decimal" }),
      cell("unit_price", { required: true, size: "8", inputmode: "decimal" }), cell("discount_percent", { size: "4", inputmode: "decimal" }), h("td", {}, li.total ? money({ amount: li.total, currency: d.amount.currency }) : ""), h("td", {}, remove));
    remove.addEventListener("click", () => tr.remove());
    return tr;
  };
  d.line_items.forEach((li) => body.append(row(li)));
  const add = h("button", { type: "button", class: "button button-quiet" }, "+ Add a line");
  add.addEventListener("click", () => { body.append(row()); body.lastChild.querySelector("input").focus(); });
  const form = h("form", { class: "form", "aria-label": "Line items" },
    h("table", { class: "table table-edit" }, h("thead", {}, h("tr", {}, ["Product id", "Product", "Quantity", `Unit price (${d.amount.currency})`, "Discount %", "Total", ""].map((x) => h("th", { scope: "col" }, x)))), body),
    d.line_items.length ? null : h("p", { class: "muted" }, "No line items: the deal's amount is set as a whole."),
    d.status === "open" ? h("div", { class: "buttons" }, add, h("button", { type: "submit", class: "button button-primary" }, "Save line items")) : null);
  return submitter(form, async () => {
    const items = [...body.querySelectorAll("tr")].map((tr) => {
      const v = (n) => tr.querySelector(`[name=${n}]`).value.trim();
      const item = { product_id: v("product_id"), product_name: v("product_name"), quantity: v("quantity"), unit_price: v("unit_price") };
      if (v("discount_percent")) item.discount_percent = v("discount_percent");
      return item;
    });
    const reply = await api("pipeline", `opportunities/${encodeURIComponent(d.id)}/line-items`, { ...write(), method: "PUT", body: { line_items: items } });
    done(reply, "Line items saved");
  });
}

function followUpForm(d) {
  const form = h("form", { class: "form form-grid" },
    field("Kind", h("select", { name: "kind" }, ["follow_up", "call", "email", "meeting", "task"].map((k) => h("option", { value: k }, label(k))))),
    field("Title", h("input", { name: "title", required: true })),
    field("Due", h("input", { name: "due_at", type: "datetime-local", required: true, value: new Date(Date.now() + 86400000 - new Date().getTimezoneOffset() * 60000).toISOString().slice(0, 16) })),
    h("div", { class: "buttons" }, h("button", { class: "button", type: "submit" }, "Schedule")));
  return submitter(form, async (data) => {
    await api("pipeline", "activities", { method: "POST", headers: { "idempotency-key": requestId() }, body: {
      subject_kind: "opportunity", subject_id: d.id, kind: data.get("kind"), title: data.get("title"), owner: boot.user.subject,
      due_at: new Date(data.get("due_at")).toISOString(),
    } });
    toast("Follow-up scheduled");
    form.reset();
  });
}

// -- forecast ---------------------------------------------------------------------------

const CATEGORIES = ["closed_won", "commit", "best_case", "pipeline", "omitted"];

export async function forecast(page, _arg, params) {
  const period = params.get("period") || "month";
  const start = params.get("start") || `${today().slice(0, 7)}-01`;
  const end = params.get("end") || today(180);
  const owner = params.get("owner") || "";
  const form = h("form", { class: "toolbar" },
    field("Period", h("select", { name: "period" }, ["month", "quarter"].map((p) => h("option", { value: p, selected: p === period }, p)))),
    field("From", h("input", { type: "date", name: "start", value: start })), field("To", h("input", { type: "date", name: "end", value: end })),
    field("Owner", h("input", { name: "owner", value: owner, placeholder: "everyone" })), h("button", { class: "button", type: "submit" }, "Show"));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/forecast?${new URLSearchParams(new FormData(form))}`; });
  page.append(pageHeader("Forecast"), form);
  const { rows } = await api("pipeline", "forecast", { query: { period, start, end, owner } });
  if (!rows.length) { page.append(empty("No deals close in this time.")); return; }
  const currencies = [...new Set(rows.map((r) => r.amount.currency))];
  for (const currency of currencies) {
    const mine = rows.filter((r) => r.amount.currency === currency);
    const periods = [...new Set(mine.map((r) => r.period))].sort();
    const cats = CATEGORIES.filter((c) => mine.some((r) => r.category === c));
    const value = (p, c) => mine.filter((r) => r.period === p && r.category === c).reduce((s, r) => s + Number(r.amount.amount), 0);
    page.append(section(`Forecast in ${currency}`,
      barChart({ title: `Forecast by ${period} and category, ${currency}`, groups: periods, series: cats.map((c) => ({ name: label(c), values: periods.map((p) => value(p, c)) })),
        format: (v) => new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 }).format(v) }),
      table(["Period", "Category", "Owner", "Deals", "Amount", "Weighted"], mine.map((r) => [r.period, label(r.category), r.owner, r.deals, money(r.amount), money(r.weighted_amount)]), { caption: `Forecast rows in ${currency}` })));
  }
}

// -- tasks ------------------------------------------------------------------------------

/** How many open activities due later the tasks page lists at a time. */
const LATER_PAGE = 50;

export async function tasks(page, _arg, params) {
  const everyone = params.get("all") === "1";
  const laterToken = params.get("later") || "";
  const toggle = h("a", { href: everyone ? "#/tasks" : "#/tasks?all=1", class: "button button-quiet" }, everyone ? "Only mine" : "Everyone's");
  page.append(pageHeader("Tasks", toggle));
  const owner = everyone ? {} : { owner: boot.user.subject };
  const now = new Date();
  const [overdue, later] = await Promise.all([
    api("pipeline", "follow-ups/overdue", { query: owner }),
    api("pipeline", "activities", { query: { ...owner, status: "open", due_from: now.toISOString(), page_size: LATER_PAGE, page_token: laterToken } }),
  ]);
  const late = overdue.owners.flatMap((o) => o.activities);
  const overdueList = h("div", { class: "stack" });
  page.append(section(`Overdue (${late.length})`, late.length ? overdueList : empty(everyone ? "Nobody has overdue follow-ups." : "You have no overdue follow-ups.")));
  for (const a of late) overdueList.append(taskCard(a, `overdue by ${duration((now - new Date(a.due_at)) / 1000)}`, "task overdue"));
  const laterList = h("div", { class: "stack" });
  const laterPage = new URLSearchParams({ ...(everyone ? { all: "1" } : {}), later: later.next_page_token });
  const paging = h("p", { class: "buttons" },
    laterToken ? h("a", { class: "button button-quiet", href: everyone ? "#/tasks?all=1" : "#/tasks" }, "Soonest first") : null,
    later.next_page_token ? h("a", { class: "button", href: `#/tasks?${laterPage}` }, "Later ones") : null);
  page.append(section(`Due later (${later.total_size})`, later.activities.length ? laterList : empty(everyone ? "Nothing else is due." : "Nothing else is due for you."), paging));
  for (const a of later.activities) laterList.append(taskCard(a, `in ${duration((new Date(a.due_at) - now) / 1000)}`, "task"));
}

/** One open activity with done and reschedule: `timing` says how overdue or how soon. */
function taskCard(a, timing, className) {
  const subject = a.subject_kind === "opportunity" ? h("a", { href: `#/deal/${encodeURIComponent(a.subject_id)}` }, "deal") : h("a", { href: `#/lead/${encodeURIComponent(a.subject_id)}` }, "lead");
  const complete = h("form", { class: "inline-form" }, h("button", { class: "button button-primary", type: "submit" }, "Done"));
  const when_ = h("input", { type: "date", name: "due", required: true, value: today(1), "aria-label": `New due date of ${a.title}` });
  const resched = h("form", { class: "inline-form" }, when_, h("button", { class: "button", type: "submit" }, "Reschedule"));
  const act = async (path, body) => {
    const current = await api("pipeline", `activities/${encodeURIComponent(a.id)}`);
    await api("pipeline", `activities/${encodeURIComponent(a.id)}/${path}`, { method: "POST", headers: { "if-match": String(current.version), "idempotency-key": requestId() }, body });
    window.dispatchEvent(new HashChangeEvent("hashchange"));
  };
  submitter(complete, () => act("complete", { outcome: "done" }));
  submitter(resched, (data) => act("reschedule", { due_at: new Date(`${data.get("due")}T09:00:00`).toISOString() }));
  return h("article", { class: className },
    h("div", {}, h("strong", {}, a.title), " ", h("span", { class: "badge" }, label(a.kind)), " on the ", subject),
    h("div", { class: "muted" }, `due ${when(a.due_at)} · ${timing} · ${a.owner}`),
    h("div", { class: "buttons" }, complete, resched));
}
