// The service console: the team queue by SLA urgency with live countdowns, cases at risk, the case page.
import {
  api, boot, h, clear, empty, section, table, field, submitter, toast, customerLink, when, label,
  statusBadge, pageHeader, requestId, rememberWrite, duration, may, liveRefresh,
} from "../ui.js";
import { contactNames, remember, recall } from "./common.js";

const STATUSES = ["new", "open", "pending", "on_hold", "solved", "closed"];

/** The earliest running deadline of a case and whether a target is breached. */
function urgency(c) {
  const running = c.clocks.filter((k) => k.due_at && k.state !== "met" && k.state !== "stopped");
  const breached = c.clocks.some((k) => k.state === "breached");
  const due = c.next_due_at || (running.length ? running.map((k) => k.due_at).sort()[0] : null);
  return { due, breached };
}

function countdown(due, breached) {
  const el = h("span", { class: "countdown", dataset: { due: due || "" } });
  const tick = () => {
    if (!due) { el.textContent = breached ? "breached" : "no running target"; el.className = `countdown${breached ? " late" : ""}`; return; }
    const left = (new Date(due) - Date.now()) / 1000;
    el.textContent = left >= 0 ? `${duration(left)} left` : `${duration(left)} overdue`;
    el.className = `countdown ${left < 0 || breached ? "late" : left < 3600 ? "soon" : "ok"}`;
  };
  tick();
  el.tick = tick;
  return el;
}

function caseTable(cases, nameOf) {
  return table(["Due", "Subject", "Customer", "Priority", "Status", "Tier", "Assignee"], cases.map((c) => {
    const u = urgency(c);
    return [countdown(u.due, u.breached), h("a", { href: `#/case/${encodeURIComponent(c.id)}` }, c.subject), customerLink(c.customer_id, nameOf(c.customer_id)),
      statusBadge(c.priority), statusBadge(c.status), c.tier ? label(c.tier) : "—", c.assignee || h("span", { class: "muted" }, "unassigned")];
  }), { caption: "Cases by SLA urgency" });
}

function ticking(root) {
  const timer = setInterval(() => root.querySelectorAll(".countdown").forEach((el) => el.tick && el.tick()), 1000);
  return () => clearInterval(timer);
}

function markBreaches(tableEl, cases) {
  [...tableEl.querySelectorAll("tbody tr")].forEach((tr, i) => { if (urgency(cases[i]).breached) tr.classList.add("row-breached"); });
}

export async function queue(page, _arg, params) {
  const team = params.get("team") || recall("crm.team") || "";
  const input = h("input", { name: "team", value: team, required: true, placeholder: "e.g. support" });
  const form = h("form", { class: "toolbar" }, field("Team", input), h("button", { class: "button", type: "submit" }, "Show queue"));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/queue?team=${encodeURIComponent(input.value.trim())}`; });
  if (!team) { page.append(pageHeader("Team queue"), form, empty("Choose your team to see its queue.")); return; }
  // Live: the console says when a case joins, leaves or changes in the queue.
  const updates = liveRefresh("queue", team, () => load());
  page.append(pageHeader("Team queue", h("div", { class: "header-meta" }, updates.badge)), form);
  remember("crm.team", team);
  const body = h("div");
  page.append(body);
  const load = async () => {
    const reply = await api("tickets", `teams/${encodeURIComponent(team)}/queue`, { query: { page_size: 100 } });
    const nameOf = await contactNames(reply.cases.map((c) => c.customer_id));
    clear(body);
    if (!reply.cases.length) { body.append(empty(`The ${team} queue is empty.`)); return; }
    const breached = reply.cases.filter((c) => urgency(c).breached).length;
    body.append(h("p", { class: "kpi" }, `${reply.cases.length} unsolved · `, h("strong", { class: breached ? "late" : "" }, `${breached} breached`)));
    const t = caseTable(reply.cases, nameOf);
    markBreaches(t, reply.cases);
    body.append(t);
  };
  try {
    await load();
  } catch (error) {
    updates.stop();
    throw error;
  }
  const stopTicks = ticking(page);
  return () => { stopTicks(); updates.stop(); };
}

export async function atRisk(page, _arg, params) {
  const within = params.get("within") || "240";
  const input = h("input", { name: "within", type: "number", min: "1", value: within });
  const form = h("form", { class: "toolbar" }, field("Due within (minutes)", input), h("button", { class: "button", type: "submit" }, "Show"));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/at-risk?within=${encodeURIComponent(input.value)}`; });
  page.append(pageHeader("Cases at risk"), form);
  const reply = await api("tickets", "cases/at-risk", { query: { within_minutes: within, page_size: 100 } });
  if (!reply.cases.length) { page.append(empty("No case is at risk in that time.")); return; }
  const nameOf = await contactNames(reply.cases.map((c) => c.customer_id));
  const t = caseTable(reply.cases, nameOf);
  markBreaches(t, reply.cases);
  page.append(t);
  return ticking(page);
}

export async function caseView(page, id) {
  const c = await api("tickets", `cases/${encodeURIComponent(id)}`);
  const nameOf = await contactNames([c.customer_id]);
  const u = urgency(c);
  const reload = () => window.dispatchEvent(new HashChangeEvent("hashchange"));
  const write = (method = "POST") => ({ method, headers: { "if-match": String(c.version), "idempotency-key": requestId() } });
  const done = (reply, text) => { rememberWrite(c.customer_id, "tickets", reply.position); toast(text); reload(); };

  page.append(pageHeader(c.subject, h("div", { class: "header-meta" }, statusBadge(c.status), " ", statusBadge(c.priority), ` · ${c.team}`, " · ", countdown(u.due, u.breached))));
  page.append(h("div", { class: "grid" },
    section("Case", h("dl", { class: "facts" }, [
      ["Customer", customerLink(c.customer_id, nameOf(c.customer_id))], ["Channel", label(c.channel)], ["Category", c.category], ["Assignee", c.assignee || "unassigned"],
      ["Customer tier", c.tier ? `${label(c.tier)} (${label(c.tier_source)})` : ""], ["Opened", when(c.opened_at)], ["Description", c.description],
    ].filter(([, v]) => v).map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
    section("Service levels", c.clocks.length ? table(["Target", "State", "Due", "Used"], c.clocks.map((k) => [label(k.kind), statusBadge(k.state), k.due_at ? countdown(k.due_at, k.state === "breached") : "—", duration(k.used_seconds)]), { caption: "SLA clocks" }) : empty("No SLA policy applies.")),
    section("Satisfaction", c.satisfaction ? h("dl", { class: "facts" }, [["CSAT", `${c.satisfaction.csat} / 5`], ["Effort (CES)", c.satisfaction.ces ?? "—"], ["NPS answer", c.satisfaction.nps ?? "—"], ["Comment", c.satisfaction.comment || "—"]].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])) : empty("No survey answer yet."))));

  page.append(section("Conversation", c.messages.length ? h("ol", { class: "messages" }, c.messages.map((m) => h("li", { class: `message ${m.internal ? "message-internal" : `message-${m.author_kind}`}` },
    h("div", { class: "message-head" }, h("strong", {}, m.author), " ", m.internal ? h("span", { class: "badge badge-internal" }, "internal note") : label(m.author_kind), " · ", when(m.at)),
    h("p", {}, m.body)))) : empty("No replies yet.")));

  if (may("tickets.ReplyToCase")) {
    const reply = h("form", { class: "form" }, field("Reply to the customer", h("textarea", { name: "body", rows: "3", required: true })), h("div", { class: "buttons" }, h("button", { class: "button button-primary", type: "submit" }, "Send reply")));
    submitter(reply, async (data) => done(await api("tickets", `cases/${encodeURIComponent(c.id)}/replies`, { ...write(), body: { author_kind: "agent", body: data.get("body") } }), "Reply sent"));
    const note = h("form", { class: "form" }, field("Internal note (the customer does not see it)", h("textarea", { name: "body", rows: "2", required: true })), h("div", { class: "buttons" }, h("button", { class: "button", type: "submit" }, "Add note")));
    submitter(note, async (data) => done(await api("tickets", `cases/${encodeURIComponent(c.id)}/notes`, { ...write(), body: { body: data.get("body") } }), "Note added"));
    const status = h("form", { class: "inline-form" }, field("Status", h("select", { name: "status" }, STATUSES.map((s) => h("option", { value: s, selected: s === c.status }, label(s))))), h("button", { class: "button", type: "submit" }, "Change status"));
    submitter(status, async (data) => done(await api("tickets", `cases/${encodeURIComponent(c.id)}/status`, { ...write(), body: { status: data.get("status") } }), "Status changed"));
    const assign = h("form", { class: "inline-form" }, field("Assignee", h("input", { name: "assignee", value: c.assignee || boot.user.subject, required: true })), h("button", { class: "button", type: "submit" }, "Assign"));
    submitter(assign, async (data) => done(await api("tickets", `cases/${encodeURIComponent(c.id)}/assignee`, { ...write(), body: { assignee: data.get("assignee") } }), "Case assigned"));
    page.append(h("div", { class: "grid" }, section("Reply", reply), section("Note", note), section("Status and owner", status, assign)));
  }
  if (may("tickets.RecordSatisfaction") && !c.satisfaction && (c.status === "solved" || c.status === "closed")) {
    const survey = h("form", { class: "inline-form" }, field("CSAT (1–5)", h("input", { name: "csat", type: "number", min: "1", max: "5", required: true })),
      field("NPS (0–10)", h("input", { name: "nps", type: "number", min: "0", max: "10" })), field("Comment", h("input", { name: "comment" })),
      h("button", { class: "button", type: "submit" }, "Record the answer"));
    submitter(survey, async (data) => done(await api("tickets", `cases/${encodeURIComponent(c.id)}/satisfaction`, { method: "POST", body: {
      csat: Number(data.get("csat")), nps: data.get("nps") ? Number(data.get("nps")) : null, comment: data.get("comment") || "" } }), "Survey answer recorded"));
    page.append(section("Customer's survey answer", survey));
  }
  page.append(section("History", table(["When", "What", "Details"], c.history.map((e) => [when(e.at), label(e.what), Object.entries(e.details).map(([k, v]) => `${label(k)}: ${v}`).join(" · ")]), { caption: "Case history" })));
  return ticking(page);
}
