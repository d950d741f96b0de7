"""The lifecycle stage of a contact and the funnel it moves forward through."""

from __future__ import annotations

from enum import StrEnum

from crm_common.errors import RuleViolated


class LifecycleStage(StrEnum):
    SUBSCRIBER = "subscriber"
    LEAD = "lead"
    OPPORTUNITY = "opportunity"
    CUSTOMER = "customer"
    ADVOCATE = "advocate"
    CHURNED = "churned"
    LOST = "lost"


# The funnel a contact moves forward through; churned and lost are exits.
FUNNEL: tuple[LifecycleStage, ...] = (
    LifecycleStage.SUBSCRIBER,
    LifecycleStage.LEAD,
    LifecycleStage.OPPORTUNITY,
    LifecycleStage.CUSTOMER,
    LifecycleStage.ADVOCATE,
)
# Only someone who was a customer can churn; who never became one is lost.
CAN_CHURN = frozenset({LifecycleStage.CUSTOMER, LifecycleStage.ADVOCATE})
CAN_BE_LOST = frozenset(
    {LifecycleStage.SUBSCRIBER, LifecycleStage.LEAD, LifecycleStage.OPPORTUNITY}
)
# Who a won deal leaves as they are: already a customer, or further along.
CUSTOMER_ALREADY = frozenset({LifecycleStage.CUSTOMER, LifecycleStage.ADVOCATE})


def check_stage_change(current: LifecycleStage, wanted: LifecycleStage) -> None:
    """Refuses a lifecycle move the funnel does not allow.

    Within the funnel a contact only moves forward (stages may be skipped).
    A customer or advocate can churn, a subscriber, lead or opportunity can be
    lost, and a churned or lost contact can come back at any funnel stage.
    A stage set by mistake is undone through churned or lost, so that the
    funnel reports never count a contact going backwards.
    """
    if wanted == current:
        return
    if wanted is LifecycleStage.CHURNED:
        allowed = current in CAN_CHURN
    elif wanted is LifecycleStage.LOST:
        allowed = current in CAN_BE_LOST
    elif current in (LifecycleStage.CHURNED, LifecycleStage.LOST):
        allowed = True
    else:
        allowed = FUNNEL.index(wanted) > FUNNEL.index(current)
    if not allowed:
        raise RuleViolated(f"lifecycle_stage cannot change from {current} to {wanted}")


# -- lifecycle rules: stages moved by what happens elsewhere ----------------------------
#
# Each rule names the stage it moves a contact to and the stages it moves it
# from; a contact at any other stage is left as it is (no event), so a rule
# never moves anyone backwards in the funnel and never fails. Every move a
# rule makes is recorded with its cause (the rule and the event that fired it).


class LifecycleRule(StrEnum):
    #: A deal opened for the contact: a subscriber or lead (or one who was lost
    #: or churned and comes back) becomes an opportunity.
    DEAL_OPENED = "deal_opened"
    #: A deal of the contact was won: anyone not yet a customer becomes one.
    DEAL_WON = "deal_won"
    #: The customer's last purchase (an order, or a won deal) is older than the
    #: churn period: a customer becomes churned. An advocate is left as it is
    #: (a stage a person gives by hand, not one a quiet period takes away).
    NO_PURCHASE = "no_purchase"
    #: A purchase (an order) after the contact churned: it is a customer again.
    PURCHASE = "purchase"


RULE_TARGET: dict[LifecycleRule, LifecycleStage] = {
    LifecycleRule.DEAL_OPENED: LifecycleStage.OPPORTUNITY,
    LifecycleRule.DEAL_WON: LifecycleStage.CUSTOMER,
    LifecycleRule.NO_PURCHASE: LifecycleStage.CHURNED,
    LifecycleRule.PURCHASE: LifecycleStage.CUSTOMER,
}
RULE_MOVES_FROM: dict[LifecycleRule, frozenset[LifecycleStage]] = {
    LifecycleRule.DEAL_OPENED: frozenset(
        {
            LifecycleStage.SUBSCRIBER,
            LifecycleStage.LEAD,
            LifecycleStage.LOST,
            LifecycleStage.CHURNED,
        }
    ),
    LifecycleRule.DEAL_WON: frozenset(LifecycleStage) - CUSTOMER_ALREADY,
    LifecycleRule.NO_PURCHASE: frozenset({LifecycleStage.CUSTOMER}),
    LifecycleRule.PURCHASE: frozenset({LifecycleStage.CHURNED}),
}


def stage_after_rule(rule: LifecycleRule, current: LifecycleStage) -> LifecycleStage | None:
    """The stage `rule` moves a contact at `current` to; None: it stays."""
    return RULE_TARGET[rule] if current in RULE_MOVES_FROM[rule] else None
