// Customer search and the 360-degree customer page: every console has them.
import {
  api, boot, h, clear, empty, section, wideSection, table, field, submitter, toast,
  customerLink, money, when, label, statusBadge, pageHeader, requestId, rememberWrite,
  pendingWrites, forgetWrites, may, liveRefresh, typing,
} from "../ui.js";

const LIFECYCLE = ["subscriber", "lead", "opportunity", "customer", "advocate", "churned", "lost"];

function searchQuery(q) {
  if (/^[^\s@]+@[^\s@]+$/.test(q)) return { email: q };
  if (/^\+?[\d\s()-]{6,}$/.test(q)) return { phone: q.replace(/[\s()-]/g, "") };
  return { query: q };
}

export async function search(page, _arg, params) {
  const q = (params.get("q") || "").trim();
  const input = h("input", { type: "search", name: "q", value: q, placeholder: "Name, email or phone", autocomplete: "off" });
  const form = h("form", { class: "inline-form", role: "search" }, field("Find a customer", input), h("button", { class: "button button-primary", type: "submit" }, "Search"));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/search?q=${encodeURIComponent(input.value.trim())}`; });
  page.append(pageHeader("Customers"), form);
  const results = h("div", { class: "results", "aria-live": "polite" });
  page.append(results);
  if (!q) { results.append(empty("Search by name, email address or phone number.")); return; }
  const list = await api("contacts", "contacts", { query: { ...searchQuery(q), page_size: 50 } });
  if (!list.contacts.length) { results.append(empty(`No customer matches “${q}”.`)); return; }
  results.append(
    h("p", { class: "muted" }, `${list.total_size} found`),
    table(["Name", "Kind", "Stage", "Email / phone", "Companies", "Owner"], list.contacts.map((c) => [
      customerLink(c.id, c.name),
      label(c.kind),
      statusBadge(c.lifecycle_stage),
      c.channels.map((ch) => ch.address).join(", ") || "—",
      c.affiliations.length ? c.affiliations.map((a, i) => [i ? ", " : "", customerLink(a.company_id, a.company_name)]) : "—",
      c.owner || "—",
    ]), { caption: "Customers found" }),
  );
  const first = results.querySelector("a.customer-link");
  if (first && document.activeElement === input) first.focus();
}

function dl(pairs) {
  return h("dl", { class: "facts" }, pairs.filter(([, v]) => v !== undefined && v !== null && v !== "").map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]));
}

function dealHref(id) { return `#/deal/${encodeURIComponent(id)}`; }
function caseHref(id) { return `#/case/${encodeURIComponent(id)}`; }

function cases(list, title) {
  if (!list.length) return empty(`No ${title.toLowerCase()}.`);
  return table(["Subject", "Status", "Priority", "Team", "Opened", "SLA", "Satisfaction"], list.map((c) => [
    boot.console === "service" ? h("a", { href: caseHref(c.case_id) }, c.subject || c.case_id) : (c.subject || c.case_id),
    statusBadge(c.status),
    label(c.priority),
    c.team || "—",
    when(c.opened_at),
    c.sla ? (c.sla.breached ? h("span", { class: "badge badge-breached" }, "breached") : (c.sla.next_deadline ? `due ${when(c.sla.next_deadline)}` : label(c.sla.state))) : "—",
    c.satisfaction ? `CSAT ${c.satisfaction.csat}/5` : "—",
  ]), { caption: title });
}

export async function customer360(page, id) {
  const waitFor = pendingWrites(id);
  const doc = await api("analytics", `customers/${encodeURIComponent(id)}/360`, {
    query: waitFor.length ? { wait_for: waitFor, timeout_ms: 5000 } : {},
  });
  forgetWrites(id);
  // Live: the console says when the 360 view of this customer changed (server-sent
  // events); the page draws it again unless the user is typing.
  const updates = liveRefresh("customer", id, () => reload(page, id), () => typing(page));
  page.liveBadge = updates.badge;
  try {
    render360(page, id, doc);
  } catch (error) {
    updates.stop();
    throw error;
  }
  return updates.stop;
}

function render360(page, id, reply) {
  const c = reply && reply.customer_id ? reply : null;
  if (!c) throw new Error("The 360 view answered without a customer.");
  clear(page);
  page.append(pageHeader(c.display_name || "Unnamed customer",
    h("div", { class: "header-meta" }, statusBadge(c.lifecycle_stage), " ", label(c.kind), c.owner ? ` · owner ${c.owner}` : "",
      (c.tags || []).map((t) => h("span", { class: "tag" }, t))), page.liveBadge));
  const grid = h("div", { class: "grid" });
  page.append(grid);

  const profile = [
    ["Given name", c.given_name], ["Family name", c.family_name], ["Domain", c.domain], ["Industry", c.industry],
    ["Customer since", when(c.created_at, { time: false })], ["Last change", when(c.updated_at)],
  ];
  for (const [k, v] of Object.entries(c.custom_fields || {})) profile.push([k, v.type === "money" ? money({ amount: v.value, currency: v.currency }) : v.value]);
  grid.append(section("Profile", dl(profile)));

  if (c.channels) {
    grid.append(wideSection("Contact and consent", c.channels.length ? table(["Channel", "Address", "Consent", "Source", "Recorded"], c.channels.map((ch) => [
      label(ch.channel) + (ch.preferred ? " (preferred)" : ""), ch.address, statusBadge(ch.consent && ch.consent.status || "unknown"), (ch.consent && ch.consent.source) || "—", when(ch.consent && ch.consent.recorded_at),
    ]), { caption: "Channels and consent" }) : empty("No channels recorded.")));
  }
  if (c.companies && c.companies.length) {
    grid.append(section("Companies", h("ul", { class: "plain" }, c.companies.map((m) => h("li", {}, customerLink(m.company_id, m.company_name), m.role ? ` · ${m.role}` : "")))));
  }
  if (c.members && c.members.length) {
    grid.append(section("People", h("ul", { class: "plain" }, c.members.map((m) => h("li", {}, customerLink(m.person_id, m.person_id), m.role ? ` · ${m.role}` : "")))));
  }
  if (c.deals) {
    const revenue = (c.lifetime_won_revenue || []).map(money).join(" + ");
    grid.append(wideSection("Deals",
      revenue ? h("p", { class: "kpi" }, h("span", { class: "kpi-label" }, "Lifetime won revenue "), h("strong", {}, revenue)) : null,
      c.deals.length ? table(["Deal", "Stage", "Status", "Amount", "Expected close", "Owner"], c.deals.map((d) => [
        boot.console === "sales" ? h("a", { href: dealHref(d.opportunity_id) }, d.name) : d.name,
        `${d.stage_name} (${d.pipeline_name})`, statusBadge(d.status), d.amount ? money(d.amount) : "—", when(d.expected_close_date, { time: false }), d.owner,
      ]), { caption: "Deals" }) : empty("No deals.")));
  }
  if (c.tickets) {
    const s = c.tickets.satisfaction;
    grid.append(wideSection("Cases",
      s && s.responses ? h("p", { class: "kpi" }, `CSAT ${s.csat_average?.toFixed?.(1) ?? "—"} / 5 over ${s.responses} survey${s.responses > 1 ? "s" : ""}`, s.nps_average != null ? ` · NPS answer ${s.nps_average.toFixed(1)}` : "") : null,
      h("h3", {}, "Open"), cases(c.tickets.open_cases, "Open cases"),
      h("h3", {}, "Recent"), cases(c.tickets.recent_cases, "Recent cases")));
  }
  if (c.loyalty) {
    const l = c.loyalty;
    grid.append(section("Loyalty",
      dl([["Member number", l.member_number], ["Tier", statusBadge(l.tier)], ["Points", `${l.balance.active} active · ${l.balance.locked} locked · ${l.balance.spent} spent`],
        ["Expiring soon", l.points_expiring_soon ? `${l.points_expiring_soon} points` : "none"], ["Enrolled", when(l.enrolled_at, { time: false })],
        ["Next downgrade", l.downgrade ? `to ${l.downgrade.to_tier} on ${when(l.downgrade.due_at, { time: false })}` : null]]),
      boot.console === "marketing" ? h("p", {}, h("a", { href: `#/member/${encodeURIComponent(c.customer_id)}` }, "Open the membership")) : null));
  }
  if (c.timeline) {
    const items = [...c.timeline].sort((a, b) => String(b.occurred_at).localeCompare(String(a.occurred_at)));
    grid.append(section("Timeline", items.length ? h("ol", { class: "timeline" }, items.map((e) => h("li", { class: `tl tl-${e.source}` },
      h("time", { datetime: e.occurred_at || "" }, when(e.occurred_at)), " ",
      h("span", { class: "badge" }, label(e.kind)), " ", e.summary, e.owner ? h("span", { class: "muted" }, ` · ${e.owner}`) : ""))) : empty("Nothing has happened yet."),
    ));
  }
  grid.append(actions360(page, c));
}

function actions360(page, c) {
  const box = h("div", { class: "stack" });
  if (may("contacts.LogInteraction")) {
    const kind = h("select", { name: "kind" }, ["call", "mail", "chat", "meeting", "visit"].map((k) => h("option", { value: k }, k)));
    const summary = h("input", { name: "summary", required: true, maxlength: "500", placeholder: "What was said or agreed" });
    const form = h("form", { class: "form", "aria-label": "Log an interaction" }, field("Kind", kind), field("Summary", summary),
      h("button", { class: "button button-primary", type: "submit" }, "Log interaction"));
    submitter(form, async (data) => {
      const reply = await api("contacts", `contacts/${encodeURIComponent(c.customer_id)}/interactions`, {
        method: "POST", headers: { "idempotency-key": requestId() },
        body: { kind: data.get("kind"), summary: data.get("summary"), owner: boot.user.subject },
      });
      rememberWrite(c.customer_id, "contacts", reply.position);
      toast("Interaction logged");
      await reload(page, c.customer_id);
    });
    box.append(section("Log an interaction", form));
  }
  const op = c.kind === "company" ? "contacts.UpdateCompany" : "contacts.UpdatePerson";
  if (may(op)) {
    const stage = h("select", { name: "lifecycle_stage" }, LIFECYCLE.map((s) => h("option", { value: s, selected: s === c.lifecycle_stage }, label(s))));
    const tags = h("input", { name: "tags", value: (c.tags || []).join(", "), placeholder: "comma separated" });
    const form = h("form", { class: "form", "aria-label": "Edit the profile" }, field("Lifecycle stage", stage), field("Tags", tags),
      h("button", { class: "button", type: "submit" }, "Save profile"));
    submitter(form, async (data) => {
      const current = await api("contacts", `contacts/${encodeURIComponent(c.customer_id)}`);
      const path = c.kind === "company" ? "companies" : "persons";
      const reply = await api("contacts", `${path}/${encodeURIComponent(c.customer_id)}`, {
        method: "PATCH", headers: { "if-match": String(current.version), "idempotency-key": requestId() },
        body: { lifecycle_stage: data.get("lifecycle_stage"), tags: String(data.get("tags")).split(",").map((t) => t.trim()).filter(Boolean) },
      });
      rememberWrite(c.customer_id, "contacts", reply.position);
      toast("Profile saved");
      await reload(page, c.customer_id);
    });
    box.append(section("Edit the profile", form));
  }
  return box;
}

async function reload(page, id) {
  const waitFor = pendingWrites(id);
  const reply = await api("analytics", `customers/${encodeURIComponent(id)}/360`, { query: { wait_for: waitFor, timeout_ms: 5000 } });
  forgetWrites(id);
  render360(page, id, reply);
}
