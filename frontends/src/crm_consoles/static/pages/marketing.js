// The marketing console: loyalty members (tier, balance, lots), rewards and earning rules.
import {
  api, h, empty, section, table, field, submitter, toast, customerLink, when, label, statusBadge,
  pageHeader, requestId, rememberWrite, may, problem, clear, liveRefresh, typing,
} from "../ui.js";
import { contactNames } from "./common.js";

const ORDERS = [["available_desc", "Most points available first"], ["contact_id", "By customer id"]];

export async function members(page, _arg, params) {
  const q = (params.get("q") || "").trim();
  const input = h("input", { name: "q", type: "search", value: q, placeholder: "Customer name, email or phone" });
  const form = h("form", { class: "toolbar", role: "search" }, field("Find a member", input), h("button", { class: "button button-primary", type: "submit" }, "Search"));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/members?q=${encodeURIComponent(input.value.trim())}`; });
  page.append(pageHeader("Members"), form);
  if (q) { await memberSearch(page, q); return; }
  if (!may("loyalty.ListMembers")) { page.append(empty("Find a customer to see their membership.")); return; }
  await memberList(page, params);
}

/** Every member (ListMembers), filtered by tier and balance, a page at a time. */
async function memberList(page, params) {
  const tier = params.get("tier") || "";
  const order = params.get("order") || "available_desc";
  const least = params.get("min") || "";
  const filters = h("form", { class: "toolbar" },
    field("Tier", h("input", { name: "tier", value: tier, placeholder: "every tier" })),
    field("At least (points available)", h("input", { name: "min", type: "number", min: "0", value: least })),
    field("Order", h("select", { name: "order" }, ORDERS.map(([v, t]) => h("option", { value: v, selected: v === order }, t)))),
    h("button", { class: "button", type: "submit" }, "Show"));
  filters.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/members?${new URLSearchParams(new FormData(filters))}`; });
  page.append(filters);
  const reply = await api("loyalty", "members", { query: { tier, min_available: least, order_by: order, page_size: 50, page_token: params.get("page") || "" } });
  if (!reply.members.length) { page.append(empty(tier || least ? "No member matches these filters." : "No members yet.")); return; }
  const nameOf = await contactNames(reply.members.map((m) => m.contact_id));
  page.append(table(["Member", "Tier", "Available", "Locked", "Earned", "Next expiry", "Last activity"], reply.members.map((m) => [
    h("a", { href: `#/member/${encodeURIComponent(m.contact_id)}` }, nameOf(m.contact_id) || m.contact_id),
    statusBadge(m.tier), m.balance.active, m.balance.locked, m.earned,
    m.next_expiry_at ? `${m.next_expiry_points} on ${when(m.next_expiry_at, { time: false })}` : "—",
    when(m.last_activity_at),
  ]), { caption: "Members" }));
  if (reply.next_page_token) {
    const next = new URLSearchParams({ tier, min: least, order, page: reply.next_page_token });
    page.append(h("p", {}, h("a", { href: `#/members?${next}` }, "Next members")));
  }
}

/** Members among the customers a search finds (GetMemberTier per customer). */
async function memberSearch(page, q) {
  const query = q.includes("@") ? { email: q } : { query: q };
  const list = await api("contacts", "contacts", { query: { ...query, kind: "person", page_size: 25 } });
  if (!list.contacts.length) { page.append(empty(`No customer matches “${q}”.`)); return; }
  const rows = await Promise.all(list.contacts.map(async (c) => {
    try { const t = await api("loyalty", `members/${encodeURIComponent(c.id)}/tier`); return [c, t]; } catch (error) { return [c, error]; }
  }));
  page.append(table(["Customer", "Membership", "Tier", "Qualifying points", "To next tier"], rows.map(([c, t]) => [
    customerLink(c.id, c.name),
    t.status === 404 ? h("a", { href: `#/member/${encodeURIComponent(c.id)}` }, "not a member: enrol") : t.status ? problem(t, { compact: true }) : h("a", { href: `#/member/${encodeURIComponent(c.id)}` }, "open"),
    t.tier ? statusBadge(t.tier) : "—", t.qualifying_points ?? "—", t.next_tier ? `${t.points_to_next_tier} to ${t.next_tier}` : "—",
  ]), { caption: "Members found" }));
}

export async function member(page, contactId) {
  // Live: the console says when the membership changed (an ERP order earned points,
  // the tier moved, someone adjusted the balance); the page draws it again unless
  // the user is filling in a form.
  const updates = liveRefresh("member", contactId, async () => {
    const fresh = h("div");
    await drawMember(fresh, contactId, updates.badge);
    clear(page).append(...fresh.childNodes);
  }, () => typing(page));
  try {
    await drawMember(page, contactId, updates.badge);
  } catch (error) {
    updates.stop();
    throw error;
  }
  return updates.stop;
}

async function drawMember(page, contactId, badge) {
  const nameOf = await contactNames([contactId]);
  const reload = () => window.dispatchEvent(new HashChangeEvent("hashchange"));
  let m;
  try {
    m = await api("loyalty", `members/${encodeURIComponent(contactId)}`);
  } catch (error) {
    if (error.status !== 404) throw error;
    page.append(pageHeader(nameOf(contactId) || "Not a member", h("div", { class: "header-meta" }, badge)), h("p", {}, customerLink(contactId, nameOf(contactId) || contactId), " is not a loyalty member."));
    if (may("loyalty.EnrolMember")) {
      const enrol = h("form", { class: "inline-form" }, field("Channel", h("select", { name: "channel" }, ["web", "store", "app", "phone", "email"].map((c) => h("option", { value: c }, c)))), h("button", { class: "button button-primary", type: "submit" }, "Enrol"));
      submitter(enrol, async (data) => {
        const reply = await api("loyalty", "members", { method: "POST", headers: { "idempotency-key": requestId() }, body: { contact_id: contactId, channel: data.get("channel") } });
        rememberWrite(contactId, "loyalty", reply.position);
        toast("Member enrolled");
        reload();
      });
      page.append(section("Enrol", enrol));
    }
    return;
  }
  const tier = await api("loyalty", `members/${encodeURIComponent(contactId)}/tier`).catch(() => null);
  page.append(pageHeader(nameOf(contactId) || m.member_number, h("div", { class: "header-meta" }, statusBadge(m.tier), ` · member ${m.member_number} `, badge)));
  page.append(h("div", { class: "grid" },
    section("Membership", h("dl", { class: "facts" }, [
      ["Customer", customerLink(contactId, nameOf(contactId))], ["Tier", statusBadge(m.tier)],
      ["Qualifying points", tier ? tier.qualifying_points : "—"], ["Next tier", tier && tier.next_tier ? `${tier.points_to_next_tier} points to ${tier.next_tier}` : "top tier"],
      ["Enrolled", `${when(m.enrolled_at, { time: false })} via ${m.channel}`],
    ].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
    section("Balance", h("div", { class: "kpis" }, [["active", "Active"], ["locked", "Locked (return window)"], ["spent", "Spent"], ["expired", "Expired"]].map(([k, t]) =>
      h("div", { class: "kpi-box" }, h("span", { class: "kpi-label" }, t), h("strong", { class: `kpi-${k}` }, String(m.balance[k]))))))));
  page.append(section("Points by lot", m.lots.length ? table(["Earned", "Points", "Remaining", "Expires", "State", "Why"], m.lots.map((l) => [
    when(l.earned_at, { time: false }), l.earned, l.remaining, when(l.expires_at, { time: false }), l.locked ? `locked until ${when(l.locked_until, { time: false })}` : (l.remaining ? "usable" : "used up"), l.order_id ? `order ${l.order_id}` : l.reason,
  ]), { caption: "Lots" }) : empty("No points earned yet.")));
  const write = () => ({ method: "POST", headers: { "if-match": String(m.version), "idempotency-key": requestId() } });
  const done = (reply, text) => { rememberWrite(contactId, "loyalty", reply.position); toast(text); reload(); };
  const forms = [];
  if (may("loyalty.AdjustPoints")) {
    const adjust = h("form", { class: "inline-form" }, field("Points (+/−)", h("input", { name: "points", type: "number", required: true })), field("Reason", h("input", { name: "reason", required: true })), h("button", { class: "button", type: "submit" }, "Adjust"));
    submitter(adjust, async (data) => done(await api("loyalty", `members/${encodeURIComponent(contactId)}/adjustments`, { ...write(), body: { points: Number(data.get("points")), reason: data.get("reason") } }), "Points adjusted"));
    forms.push(section("Adjust points", adjust));
  }
  if (may("loyalty.RedeemReward")) {
    const rewards = await api("loyalty", "rewards").catch(() => []);
    if (rewards.length) {
      const redeem = h("form", { class: "inline-form" }, field("Reward", h("select", { name: "code" }, rewards.map((r) => h("option", { value: r.code }, `${r.name} (${r.points} points)`)))), h("button", { class: "button", type: "submit" }, "Redeem"));
      submitter(redeem, async (data) => done(await api("loyalty", `members/${encodeURIComponent(contactId)}/reward-redemptions`, { ...write(), body: { code: data.get("code") } }), "Reward redeemed"));
      forms.push(section("Redeem a reward", redeem));
    }
  }
  if (forms.length) page.append(h("div", { class: "grid" }, forms));
}

export async function rewards(page) {
  page.append(pageHeader("Rewards"));
  const list = await api("loyalty", "rewards", { query: { include_retired: "true" } });
  const reload = () => window.dispatchEvent(new HashChangeEvent("hashchange"));
  page.append(section("Catalogue", list.length ? table(["Code", "Reward", "Points", "In stock", "Reserved", "Valid", "", ""], list.map((r) => {
    const restock = h("form", { class: "inline-form" }, h("input", { name: "quantity", type: "number", min: "1", required: true, size: "4", "aria-label": `Restock ${r.name} by` }), h("button", { class: "button button-quiet", type: "submit" }, "Restock"));
    submitter(restock, async (data) => { await api("loyalty", `rewards/${encodeURIComponent(r.code)}/restock`, { method: "POST", headers: { "if-match": String(r.version), "idempotency-key": requestId() }, body: { quantity: Number(data.get("quantity")) } }); toast("Restocked"); reload(); });
    const retire = h("form", { class: "inline-form" }, h("button", { class: "button button-quiet", type: "submit" }, "Retire"));
    submitter(retire, async () => { await api("loyalty", `rewards/${encodeURIComponent(r.code)}/retire`, { method: "POST", headers: { "if-match": String(r.version), "idempotency-key": requestId() } }); toast("Retired"); reload(); });
    return [r.code, r.name, r.points, r.stock, r.reserved, `${r.valid_from ? when(r.valid_from, { time: false }) : "always"} – ${r.valid_until ? when(r.valid_until, { time: false }) : "open"}`,
      r.retired ? statusBadge("retired") : (may("loyalty.RestockReward") ? restock : ""), r.retired || !may("loyalty.RetireReward") ? "" : retire];
  }), { caption: "Rewards" }) : empty("No rewards defined yet.")));
  if (may("loyalty.DefineReward")) {
    const form = h("form", { class: "form form-grid" }, field("Code", h("input", { name: "code", required: true })), field("Name", h("input", { name: "name", required: true })),
      field("Points", h("input", { name: "points", type: "number", min: "1", required: true })), field("Stock", h("input", { name: "stock", type: "number", min: "0", value: "0" })),
      h("div", { class: "buttons" }, h("button", { class: "button button-primary", type: "submit" }, "Define reward")));
    submitter(form, async (data) => { await api("loyalty", "rewards", { method: "POST", headers: { "idempotency-key": requestId() }, body: { code: data.get("code"), name: data.get("name"), points: Number(data.get("points")), stock: Number(data.get("stock") || 0) } }); toast("Reward defined"); reload(); });
    page.append(section("New reward", form));
  }
}

export async function rules(page) {
  page.append(pageHeader("Earning rules"));
  const r = await api("loyalty", "earning-rules");
  const pairs = (obj, unit) => Object.keys(obj || {}).length ? table(["", unit], Object.entries(obj).map(([k, v]) => [label(k), v])) : empty("None.");
  page.append(h("div", { class: "grid" },
    section(`Version ${r.version ?? "—"}`, h("dl", { class: "facts" }, [["Points live for", `${r.lot_lifetime_days} days`], ["Return window", `${r.return_window_days} days`]].map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]))),
    section("Points per unit of currency", pairs(r.rates, "rate")),
    section("Tier multipliers", pairs(r.tier_multipliers, "factor")),
    section("Category multipliers", pairs(r.category_multipliers, "factor"))));
  page.append(section("Campaigns", (r.campaigns || []).length ? table(["Campaign", "Factor", "From", "Until", "Categories"], r.campaigns.map((c) => [c.name, c.factor, when(c.starts_at), when(c.ends_at), (c.categories || []).join(", ") || "all"])) : empty("No campaigns.")));
}
