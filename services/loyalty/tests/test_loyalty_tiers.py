"""Tiers as deployable configuration: the file, its checks, and tiers by spend."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from loyalty_support import Clock, KnownContacts, sqlite_settings

from crm_common.commands import Caller
from crm_deploy.identity import Identity
from crm_deploy.testing import clean_environment, start_process
from crm_loyalty import tier_config
from crm_loyalty.application import LoyaltyService, create_application
from crm_loyalty.inputs import OrderLineInput, PlacedOrder, ReturnedOrder

ERP = Caller(actor="erp", client="test")


def test_the_packaged_file_is_the_default_policy() -> None:
    policy = tier_config.load()
    assert [t.name for t in policy.tiers] == ["basic", "silver", "gold", "vip"]
    assert (policy.basis, policy.window, policy.grace) == (
        "points",
        timedelta(days=365),
        timedelta(days=30),
    )


def test_every_mistake_is_named_with_its_field(tmp_path: Path) -> None:
    path = tmp_path / "tiers.yaml"
    path.write_text(
        "basis: spend\nwindow_days: 0\ncolour: blue\n"
        "tiers:\n  - {name: basic, threshold: 10}\n  - {name: Gold, threshold: 5}\n"
        "  - {name: silver, threshold: 5}\n  - {name: vip, threshold: 3}\n"
    )
    with pytest.raises(tier_config.TierConfigError) as error:
        tier_config.load(path)
    text = str(error.value)
    assert str(path) in text
    for expected in (
        "colour: is not a setting",
        "window_days: must be a whole number of days from 1 to 3650, not 0",
        "currency: an ISO 4217 currency code is required",
        "tiers[0].threshold: the first tier starts at 0, not 10",
        "tiers[1].name: lower-case letters",
        "tiers[3].threshold: must rise above silver's 5",
    ):
        assert expected in text, text
    with pytest.raises(tier_config.TierConfigError, match="is not YAML"):
        path.write_text("tiers: [unclosed")
        tier_config.load(path)
    with pytest.raises(tier_config.TierConfigError, match="cannot be read"):
        tier_config.load(tmp_path / "missing.yaml")


async def test_tiers_by_spend_count_money_in_the_currency_less_returns(
    tmp_path: Path, clock: Clock
) -> None:
    policy = tier_config.parse(
        {
            "basis": "spend",
            "currency": "eur",
            "window_days": 90,
            "grace_days": 10,
            "tiers": [{"name": "member", "threshold": 0}, {"name": "plus", "threshold": 150}],
        }
    )
    assert policy.currency == "EUR"
    service = LoyaltyService(
        create_application(sqlite_settings(tmp_path)), KnownContacts("c-1"), clock=clock,
        tiers=policy,
    )  # fmt: skip
    try:
        usd = PlacedOrder("o-0", "c-1", "USD", [OrderLineInput("1", "500", "shoes")])
        await service.place_order(ERP, usd)
        assert (await service.get_tier("c-1")).tier == "member"  # dollars do not count
        eur = PlacedOrder(
            "o-1", "c-1", "EUR", [OrderLineInput("1", "100.50", ""), OrderLineInput("2", "60", "")]
        )
        await service.place_order(ERP, eur)
        tier = await service.get_tier("c-1")
        assert (tier.tier, tier.qualifying_points, tier.basis, tier.currency) == (
            "plus",
            160,
            "spend",
            "EUR",
        )
        # A returned line no longer counts: below the tier, down after the grace period.
        await service.return_order(ERP, ReturnedOrder("o-1", "c-1", "r-1", ["2"]))
        assert (await service.get_tier("c-1")).qualifying_points == 100
        assert (await service.get_member("c-1")).tier == "plus"
        clock.advance(days=11)
        await service.settle(ERP, "c-1")
        assert (await service.get_member("c-1")).tier == "member"
    finally:
        service.close()


def test_a_process_with_a_broken_tier_file_does_not_start(
    tmp_path: Path, identity: Identity, processes: list[subprocess.Popen[bytes]]
) -> None:
    broken = tmp_path / "tiers.yaml"
    broken.write_text("tiers:\n  - {name: basic, threshold: 0}\n  - {name: gold, threshold: -1}\n")
    env = clean_environment(tmp_path, identity, CRM_LOYALTY_TIERS_FILE=str(broken))
    log = tmp_path / "serve.log"
    process = start_process("loyalty", "serve", env, log, processes)
    assert process.wait(60) == 2
    assert "tiers[1].threshold: must be a whole number from 0, not -1" in log.read_text()


def test_the_configuration_may_come_as_text_as_the_chart_sends_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "CRM_LOYALTY_TIERS_YAML",
        "basis: spend\ncurrency: GBP\n"
        "tiers:\n- {name: a, threshold: 0}\n- {name: b, threshold: 9}\n",
    )
    policy = tier_config.load()
    assert (policy.basis, policy.currency, policy.tiers[1].threshold) == ("spend", "GBP", 9)
    monkeypatch.setenv("CRM_LOYALTY_TIERS_YAML", "tiers: []")
    with pytest.raises(tier_config.TierConfigError, match="CRM_LOYALTY_TIERS_YAML"):
        tier_config.load()
