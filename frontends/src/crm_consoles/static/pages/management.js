// The management console: pipeline funnel, win rate and revenue by period; SLA compliance
// and the satisfaction (CSAT / NPS) trend.
import { api, h, empty, section, table, field, money, label, pageHeader, today, duration, problem } from "../ui.js";
import { barChart, lineChart, remember, recall } from "./common.js";

const compact = (v) => new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 }).format(v);

export async function dashboard(page, _arg, params) {
  const { pipelines } = await api("pipeline", "pipelines");
  page.append(pageHeader("Sales dashboard"));
  if (!pipelines.length) { page.append(empty("No pipeline is defined yet.")); return; }
  const chosen = pipelines.find((p) => p.id === (params.get("pipeline") || recall("crm.pipeline"))) || pipelines[0];
  remember("crm.pipeline", chosen.id);
  const start = params.get("start") || today(-365);
  const end = params.get("end") || today();
  const form = h("form", { class: "toolbar" },
    field("Pipeline", h("select", { name: "pipeline" }, pipelines.map((p) => h("option", { value: p.id, selected: p.id === chosen.id }, p.name)))),
    field("Closed from", h("input", { type: "date", name: "start", value: start })), field("to", h("input", { type: "date", name: "end", value: end })),
    h("button", { class: "button", type: "submit" }, "Show"));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/dashboard?${new URLSearchParams(new FormData(form))}`; });
  page.append(form);
  const [funnel, winRate, forecast] = await Promise.all([
    api("pipeline", `pipelines/${encodeURIComponent(chosen.id)}/funnel`),
    api("pipeline", "win-rate", { query: { pipeline_id: chosen.id, start, end } }),
    api("pipeline", "forecast", { query: { period: "month", start, end, pipeline_id: chosen.id } }),
  ]);
  const rate = winRate.rate === null ? "—" : `${(Number(winRate.rate) * 100).toFixed(1)} %`;
  page.append(h("div", { class: "kpis" },
    kpi("Win rate", rate), kpi("Won", winRate.won), kpi("Lost", winRate.lost),
    kpi("Won value", winRate.won_amounts.map(money).join(" + ") || "—"),
    kpi("Average cycle", winRate.average_cycle_seconds ? duration(winRate.average_cycle_seconds) : "—")));
  const stages = funnel.stages.filter((s) => !s.retired);
  page.append(section("Pipeline funnel",
    barChart({ title: `Deals that entered each stage of ${chosen.name}`, groups: stages.map((s) => s.name), series: [{ name: "Deals entered", values: stages.map((s) => s.entered) }], format: compact }),
    table(["Stage", "Deals entered", "Moved back", "Advanced", "Conversion", "Open value", "Average time in stage"], stages.map((s) => [s.name, s.entered, s.regressions, s.advanced ?? "—",
      s.conversion === null ? "—" : `${(Number(s.conversion) * 100).toFixed(0)} %`, s.amounts.map(money).join(" + ") || "—", s.average_seconds_in_stage ? duration(s.average_seconds_in_stage) : "—"]), { caption: "Funnel" })));
  const won = forecast.rows.filter((r) => r.category === "closed_won");
  const currencies = [...new Set(won.map((r) => r.amount.currency))];
  if (!currencies.length) page.append(section("Revenue by month", empty("No deal was won in this time.")));
  for (const currency of currencies) {
    const mine = won.filter((r) => r.amount.currency === currency);
    const periods = [...new Set(mine.map((r) => r.period))].sort();
    page.append(section(`Revenue by month (${currency})`, barChart({ title: `Won revenue by month, ${currency}`, groups: periods,
      series: [{ name: "Won", values: periods.map((p) => mine.filter((r) => r.period === p).reduce((s, r) => s + Number(r.amount.amount), 0)) }], format: compact })));
  }
}

function kpi(title, value) { return h("div", { class: "kpi-box" }, h("span", { class: "kpi-label" }, title), h("strong", {}, String(value))); }

export async function serviceLevels(page, _arg, params) {
  const teams = (params.get("teams") || recall("crm.teams") || "").split(",").map((t) => t.trim()).filter(Boolean);
  const start = params.get("start") || today(-30);
  const end = params.get("end") || today(1);
  const interval = params.get("interval") === "month" ? "month" : "week";
  const form = h("form", { class: "toolbar" }, field("Teams (comma separated)", h("input", { name: "teams", value: teams.join(", ") })),
    field("From", h("input", { type: "date", name: "start", value: start })), field("To", h("input", { type: "date", name: "end", value: end })),
    field("Satisfaction by", h("select", { name: "interval" }, ["week", "month"].map((i) => h("option", { value: i, selected: i === interval }, i)))),
    h("button", { class: "button", type: "submit" }, "Show"));
  form.addEventListener("submit", (e) => { e.preventDefault(); location.hash = `#/service-levels?${new URLSearchParams(new FormData(form))}`; });
  page.append(pageHeader("Service levels"), form);
  const period = { period_start: `${start}T00:00:00Z`, period_end: `${end}T00:00:00Z` };
  const [trend, ...replies] = await Promise.all([
    api("tickets", "satisfaction", { query: { ...period, interval } }).catch((e) => e),
    ...teams.map((t) => api("tickets", `teams/${encodeURIComponent(t)}/sla-compliance`, { query: period }).catch((e) => e)),
  ]);
  if (teams.length) {
    remember("crm.teams", teams.join(","));
    page.append(compliance(replies));
  } else {
    page.append(section("SLA compliance", empty("Name the teams to compare.")));
  }
  page.append(satisfaction(trend));
}

function compliance(replies) {
  const ok = replies.filter((r) => !(r instanceof Error));
  const box = section("Share of targets met", ...replies.filter((r) => r instanceof Error).map((r) => problem(r)));
  if (!ok.length) return box;
  const kinds = [...new Set(ok.flatMap((r) => r.targets.map((t) => t.kind)))];
  const bars = ok.flatMap((r) => r.targets.map((t) => ({ name: `${r.team} · ${label(t.kind)}`, value: t.share_met * 100 })));
  box.append(barChart({ title: "Share of SLA targets met (percent)", groups: bars.map((b) => b.name),
    series: [{ name: "Targets met, %", values: bars.map((b) => b.value) }], format: (v) => `${Math.round(v)}` }),
  table(["Team", "Cases", ...kinds.map(label), "First reply (mean / p90)", "Resolution (mean / p90)"], ok.map((r) => [r.team, r.cases,
    ...kinds.map((k) => { const t = r.targets.find((x) => x.kind === k); return t ? `${(t.share_met * 100).toFixed(0)} % (${t.met} met, ${t.breached} breached, ${t.open} open)` : "—"; }),
    r.first_reply_count ? `${duration(r.first_reply_mean_seconds)} / ${duration(r.first_reply_p90_seconds)}` : "—",
    r.resolution_count ? `${duration(r.resolution_mean_seconds)} / ${duration(r.resolution_p90_seconds)}` : "—"]), { caption: "SLA compliance" }));
  return box;
}

/** The CSAT / NPS trend of every team's survey responses (tickets' GetSatisfactionTrend). */
function satisfaction(trend) {
  const title = "Satisfaction (CSAT / NPS)";
  if (trend instanceof Error) return section(title, problem(trend));
  const periods = trend.periods;
  if (!periods.some((p) => p.responses)) return section(title, empty("No survey was answered in this time."));
  const name = (p) => (trend.interval === "month" ? p.start.slice(0, 7) : `week of ${p.start.slice(0, 10)}`);
  const groups = periods.map(name);
  const csat = (v) => Number(v).toFixed(1);
  const nps = (v) => `${Math.round(v)}`;
  return section(title,
    lineChart({ title: `Mean CSAT and NPS by ${trend.interval}, every team`, groups,
      series: [
        { name: "Mean CSAT (1–5)", axis: "csat", values: periods.map((p) => (p.responses ? p.csat_mean : null)) },
        { name: "NPS (−100 to 100)", axis: "nps", values: periods.map((p) => (p.nps_responses ? p.nps : null)) },
      ],
      axes: { csat: { title: "CSAT", min: 1, max: 5, format: csat }, nps: { title: "NPS", min: -100, max: 100, format: nps } } }),
    table(["Period", "Responses", "Mean CSAT", "Mean CES", "NPS", "Promoters / passives / detractors"], periods.map((p) => [name(p), p.responses,
      p.responses ? csat(p.csat_mean) : "—", p.ces_responses ? `${csat(p.ces_mean)} (${p.ces_responses})` : "—",
      p.nps_responses ? nps(p.nps) : "—", p.nps_responses ? `${p.promoters} / ${p.passives} / ${p.detractors}` : "—"]), { caption: "Satisfaction by period" }));
}
