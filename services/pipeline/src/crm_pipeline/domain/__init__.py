"""The sales pipeline's write model: leads, pipelines, opportunities, activities.

One module per aggregate, each event-sourced with the `eventsourcing`
library, and `values` for the vocabulary and value objects they share. No
transport, storage or protobuf here; input checks live in
`crm_pipeline.validation`. Every change carries `at`, the time it happened,
given by the application's clock: time in stage is computed from these, not
from the wall clock. Every event carries `customer_id` (the contact id of the
customer, empty when not known yet) because the published events are keyed
by it.

Events stored before the split name their classes under the old module
(`crm_pipeline.domain:Opportunity.Won`): the names re-exported here keep
those topics resolving.
"""

from crm_pipeline.domain.activities import Activity
from crm_pipeline.domain.leads import Lead
from crm_pipeline.domain.opportunities import Opportunity, check_close_date
from crm_pipeline.domain.pipelines import Pipeline
from crm_pipeline.domain.values import (
    ACTIVITY_KINDS,
    CLOSED_LOST,
    CLOSED_WON,
    FORECAST_CATEGORIES,
    LEAD_SOURCES,
    OPEN_CATEGORIES,
    OPPORTUNITY_KINDS,
    OPPORTUNITY_STATUSES,
    SUBJECT_KINDS,
    TRANSCODINGS,
    DateAsISO,
    LineItem,
    LineItemAsDict,
    Stage,
    StageVisit,
    check_aware,
)

__all__ = [
    "ACTIVITY_KINDS",
    "CLOSED_LOST",
    "CLOSED_WON",
    "FORECAST_CATEGORIES",
    "LEAD_SOURCES",
    "OPEN_CATEGORIES",
    "OPPORTUNITY_KINDS",
    "OPPORTUNITY_STATUSES",
    "SUBJECT_KINDS",
    "TRANSCODINGS",
    "Activity",
    "DateAsISO",
    "Lead",
    "LineItem",
    "LineItemAsDict",
    "Opportunity",
    "Pipeline",
    "Stage",
    "StageVisit",
    "check_aware",
    "check_close_date",
]
