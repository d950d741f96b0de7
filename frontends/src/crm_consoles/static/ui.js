// Small building blocks shared by every console page: the API call through the
// console's backend, DOM construction without HTML strings, and the ways a page
// shows loading, refusals and results.

const boot = JSON.parse(document.getElementById("boot").textContent);
export { boot };

export class ApiError extends Error {
  constructor(status, body) {
    super((body && body.message) || `The request failed (${status}).`);
    this.status = status;
    this.error = (body && body.error) || "";
    this.detail = (body && body.detail) || [];
    this.body = body;
  }
}

/** Calls `/api/<service>/<path>` as the signed-in user; resolves to the JSON reply. */
export async function api(service, path, { method = "GET", body, query, headers = {} } = {}) {
  const url = new URL(`/api/${service}/${path.replace(/^\//, "")}`, location.origin);
  for (const [k, v] of Object.entries(query || {})) {
    if (Array.isArray(v)) v.forEach((x) => url.searchParams.append(k, x));
    else if (v !== undefined && v !== null && v !== "") url.searchParams.set(k, v);
  }
  const init = { method, headers: { accept: "application/json", ...headers }, credentials: "same-origin" };
  if (method !== "GET") init.headers["x-csrf-token"] = boot.csrf;
  if (body !== undefined) {
    init.headers["content-type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let reply;
  try {
    reply = await fetch(url, init);
  } catch (e) {
    throw new ApiError(0, { error: "NetworkError", message: "The console cannot be reached. Check your connection." });
  }
  let data = null;
  const text = await reply.text();
  if (text) {
    try { data = JSON.parse(text); } catch { data = { message: text.slice(0, 300) }; }
  }
  if (!reply.ok) throw new ApiError(reply.status, data);
  return data;
}

/** h("div", {class: "x", onclick: f}, "text", child, [children]) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (v === true) el.setAttribute(k, "");
    else el.setAttribute(k, v);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === undefined || c === null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el) { while (el.firstChild) el.removeChild(el.firstChild); return el; }

const TITLES = {
  0: "The console cannot be reached",
  401: "Not signed in",
  403: "Not allowed for your role",
  404: "Not found",
  409: "Refused",
  412: "Changed by someone else",
  422: "Please check the input",
  429: "Too many requests",
  502: "A service is unavailable",
  503: "A service is unavailable",
  504: "A service did not answer in time",
};

/** The panel a refusal or failure is shown in: what happened, the API's message, the fields. */
export function problem(error, { compact = false } = {}) {
  const status = error instanceof ApiError ? error.status : 500;
  const title = TITLES[status] || (status >= 500 ? "Something went wrong" : "The request was refused");
  const fields = (error.detail || []).filter((d) => d && (d.field || d.message));
  const box = h("div", { class: `alert alert-error${compact ? " alert-compact" : ""}`, role: "alert", dataset: { status: String(status) } },
    h("strong", { class: "alert-title" }, title),
    h("span", { class: "alert-message" }, " ", error.message),
    fields.length ? h("ul", { class: "alert-fields" }, fields.map((d) => h("li", {}, d.field ? h("code", {}, d.field) : null, " ", d.message))) : null,
    status === 401 ? h("p", {}, h("a", { href: "/signin" }, "Sign in again")) : null,
    status === 403 ? h("p", { class: "muted" }, `Signed in as ${boot.user.subject} with the role${boot.user.roles.length > 1 ? "s" : ""} ${boot.user.roles.join(", ")}.`) : null,
  );
  return box;
}

export function loading(label = "Loading…") {
  return h("div", { class: "loading", role: "status" }, h("span", { class: "spinner", "aria-hidden": "true" }), label);
}

export function empty(text) { return h("p", { class: "empty" }, text); }

export function toast(text, kind = "ok") {
  const t = document.getElementById("toast");
  clear(t).append(h("div", { class: `toast-item toast-${kind}` }, text));
  t.classList.add("show");
  clearTimeout(toast._timer);
  toast._timer = setTimeout(() => t.classList.remove("show"), 4000);
}

export function customerLink(id, name) {
  if (!id) return h("span", { class: "muted" }, "—");
  return h("a", { href: `#/customer/${encodeURIComponent(id)}`, class: "customer-link" }, name || id);
}

export function money(m) {
  if (!m || m.amount === undefined || m.amount === null || m.amount === "") return "—";
  const n = Number(m.amount);
  try {
    return new Intl.NumberFormat(undefined, { style: "currency", currency: m.currency }).format(n);
  } catch {
    return `${m.amount} ${m.currency}`;
  }
}

export function when(iso, { time = true } = {}) {
  if (!iso) return "—";
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  return time ? d.toLocaleString(undefined, { dateStyle: "medium", timeStyle: "short" }) : d.toLocaleDateString(undefined, { dateStyle: "medium" });
}

export function duration(seconds) {
  const s = Math.abs(Math.round(seconds));
  const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (d) return `${d}d ${hr}h`;
  if (hr) return `${hr}h ${m}m`;
  if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

export function label(text) { return String(text || "").replace(/_/g, " "); }

export function statusBadge(text) {
  return h("span", { class: `badge badge-${String(text || "").toLowerCase()}` }, label(text) || "—");
}

/** A section with a heading. */
export function section(title, ...body) {
  const id = `s-${title.toLowerCase().replace(/[^a-z0-9]+/g, "-")}`;
  return h("section", { class: "card", "aria-labelledby": id }, h("h2", { id }, title), ...body);
}

/** A section across the whole width of a grid. */
export function wideSection(title, ...body) {
  const el = section(title, ...body);
  el.classList.add("card-wide");
  return el;
}

export function table(headers, rows, { caption } = {}) {
  return h("div", { class: "table-wrap" }, h("table", { class: "table" },
    caption ? h("caption", { class: "visually-hidden" }, caption) : null,
    h("thead", {}, h("tr", {}, headers.map((x) => h("th", { scope: "col" }, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c)))))));
}

/** A labelled form field. */
export function field(labelText, input, hint) {
  const id = input.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  input.id = id;
  return h("div", { class: "field" }, h("label", { for: id }, labelText), input, hint ? h("small", { class: "hint" }, hint) : null);
}

/** Runs `action` for a form submit: disables the button, shows the refusal in place. */
export function submitter(form, action) {
  const out = h("div", { class: "form-result", "aria-live": "polite" });
  form.append(out);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const button = form.querySelector("button[type=submit]");
    if (button) button.disabled = true;
    clear(out);
    try {
      await action(new FormData(form));
    } catch (error) {
      out.append(problem(error, { compact: true }));
    } finally {
      if (button) button.disabled = false;
    }
  });
  return form;
}

export function pageHeader(title, ...extra) {
  document.title = `${title} · ${boot.title} · CRM`;
  return h("div", { class: "page-header" }, h("h1", {}, title), ...extra);
}

/** A key for the request id of a write, unique per attempt of one form. */
export function requestId() { return crypto.randomUUID(); }

/** Remembers that this browser wrote at `position` of `source`, so the 360 view waits for it. */
export function rememberWrite(customerId, source, position) {
  if (!customerId || !position) return;
  const key = `crm.wait.${customerId}`;
  const saved = JSON.parse(sessionStorage.getItem(key) || "{}");
  saved[source] = Math.max(saved[source] || 0, position);
  sessionStorage.setItem(key, JSON.stringify(saved));
}

export function pendingWrites(customerId) {
  const saved = JSON.parse(sessionStorage.getItem(`crm.wait.${customerId}`) || "{}");
  return Object.entries(saved).map(([s, p]) => `${s}:${p}`);
}

export function forgetWrites(customerId) { sessionStorage.removeItem(`crm.wait.${customerId}`); }

export function today(offsetDays = 0) {
  const d = new Date(Date.now() + offsetDays * 86400000);
  return d.toISOString().slice(0, 10);
}

/** May one of the user's roles run this operation (the platform's policy)? */
export function may(operation) {
  const roles = boot.operations[operation] || [];
  return boot.user.roles.some((r) => roles.includes(r));
}

/**
 * Follows a page's data through the console's server-sent events (`/live/<view>/<key>`):
 * `onChange` runs when the console says the data changed. Gives the page a badge that
 * says whether updates are live, and `stop` to close the stream when the page goes.
 */
export function live(view, key, onChange) {
  const badge = h("span", { class: "live", role: "status", dataset: { live: "connecting" } }, "Connecting live updates…");
  const set = (state, text) => { badge.dataset.live = state; badge.textContent = text; };
  const source = new EventSource(`/live/${view}/${encodeURIComponent(key)}`);
  let connectedBefore = false;
  source.addEventListener("ready", () => {
    set("on", "Live");
    // After a reconnect, something may have changed while the stream was away.
    if (connectedBefore) onChange();
    connectedBefore = true;
  });
  source.addEventListener("changed", () => { set("on", "Live"); onChange(); });
  source.addEventListener("unavailable", () => set("paused", "Live updates paused: the service does not answer"));
  source.addEventListener("refused", (event) => {
    source.close();
    let message = "";
    try { message = JSON.parse(event.data).message || ""; } catch { /* no details */ }
    set("off", `No live updates: ${message || "the service refused them"}`);
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) set("off", "No live updates: reload the page to see changes");
    else set("paused", "Reconnecting live updates…");
  };
  return { badge, stop: () => source.close() };
}

/**
 * `live` for a page that draws itself again with `refresh`: a change waits while
 * `busy()` (the user is typing or moving something) or the tab is hidden, and two
 * changes close together give one refresh.
 */
export function liveRefresh(view, key, refresh, busy = () => false) {
  let pending = false;
  let running = false;
  const attempt = async () => {
    if (!pending || running || document.hidden || busy()) return;
    pending = false;
    running = true;
    try { await refresh(); } catch { /* the next change tries again */ } finally { running = false; }
  };
  const { badge, stop } = live(view, key, () => { pending = true; attempt(); });
  const timer = setInterval(attempt, 1000);
  return { badge, stop: () => { stop(); clearInterval(timer); } };
}

/** Is the user in the middle of typing into `root` (focus in a field, or text not yet sent)? */
export function typing(root) {
  const active = document.activeElement;
  if (active && root.contains(active) && /INPUT|TEXTAREA|SELECT/.test(active.tagName)) return true;
  return [...root.querySelectorAll("input:not([type=hidden]), textarea")].some((el) => el.value !== el.defaultValue);
}
