"""What each console shows: its pages, and the API operation each page needs.

A page appears in a user's navigation when one of the user's roles may run
its operation under the platform's access policy; the API still decides on
every call, and a refusal is shown where the page would be.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Page:
    route: str
    label: str
    service: str
    operation: str


@dataclass(frozen=True)
class Console:
    name: str
    title: str
    summary: str
    pages: tuple[Page, ...]

    @property
    def home(self) -> str:
        return self.pages[0].route


SEARCH = Page("search", "Customers", "contacts", "ListContacts")

CONSOLES: dict[str, Console] = {
    "sales": Console(
        "sales",
        "Sales",
        "Pipeline, leads, deals, forecast and follow-ups",
        (
            Page("board", "Pipeline board", "pipeline", "ListOpportunities"),
            Page("leads", "Lead inbox", "pipeline", "ListLeads"),
            Page("forecast", "Forecast", "pipeline", "GetForecast"),
            Page("tasks", "Tasks", "pipeline", "ListOverdueFollowUps"),
            SEARCH,
        ),
    ),
    "service": Console(
        "service",
        "Service",
        "Team queue by SLA urgency and the cases behind it",
        (
            Page("queue", "Team queue", "tickets", "ListTeamQueue"),
            Page("at-risk", "Cases at risk", "tickets", "ListCasesAtRisk"),
            SEARCH,
        ),
    ),
    "marketing": Console(
        "marketing",
        "Marketing",
        "Loyalty members, tiers, balances and rewards",
        (
            Page("members", "Members", "loyalty", "GetMember"),
            Page("rewards", "Rewards", "loyalty", "ListRewards"),
            Page("rules", "Earning rules", "loyalty", "GetEarningRules"),
            SEARCH,
        ),
    ),
    "management": Console(
        "management",
        "Management",
        "Funnel, win rate, revenue, SLA compliance and satisfaction",
        (
            Page("dashboard", "Sales dashboard", "pipeline", "GetFunnel"),
            Page("service-levels", "Service levels", "tickets", "GetSlaCompliance"),
            SEARCH,
        ),
    ),
}
