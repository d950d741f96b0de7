"""`Pipeline`: an ordered list of stages, each with a default probability and a
forecast category. Stages are added, renamed, re-weighted, reordered and
retired; a stage id is never reused, so old events keep their meaning.

Stages arrive checked by `crm_pipeline.validation`; the pipeline keeps its
own invariants: unique stage ids, at least one open, one closed-won and one
closed-lost stage, closing stages that keep their category.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from eventsourcing.domain import Aggregate

from crm_common.errors import RuleViolated, ValidationFailed
from crm_pipeline.domain.values import CLOSED_LOST, CLOSED_WON, OPEN_CATEGORIES, Stage


def _stage_fields(stage: Stage) -> dict[str, Any]:
    return {
        "stage_id": stage.stage_id,
        "name": stage.name,
        "probability": stage.probability,
        "category": stage.category,
    }


class Pipeline(Aggregate):
    """Ordered stages a deal moves through."""

    class Defined(Aggregate.Created):
        customer_id: str
        name: str
        stages: list[dict[str, Any]]

    class StageAdded(Aggregate.Event):
        customer_id: str
        stage_id: str
        name: str
        probability: Decimal
        category: str
        position: int

        def apply(self, aggregate: Any) -> None:
            aggregate.stages[self.stage_id] = Stage(
                self.stage_id, self.name, self.probability, self.category
            )
            aggregate.order.insert(self.position, self.stage_id)

    class StageRenamed(Aggregate.Event):
        customer_id: str
        stage_id: str
        name: str

        def apply(self, aggregate: Any) -> None:
            aggregate.stages[self.stage_id].name = self.name

    class StageSettingsChanged(Aggregate.Event):
        customer_id: str
        stage_id: str
        probability: Decimal
        category: str

        def apply(self, aggregate: Any) -> None:
            stage = aggregate.stages[self.stage_id]
            stage.probability = self.probability
            stage.category = self.category

    class StagesReordered(Aggregate.Event):
        customer_id: str
        stage_ids: list[str]

        def apply(self, aggregate: Any) -> None:
            aggregate.order = list(self.stage_ids)

    class StageRetired(Aggregate.Event):
        customer_id: str
        stage_id: str

        def apply(self, aggregate: Any) -> None:
            aggregate.stages[self.stage_id].retired = True
            aggregate.order.remove(self.stage_id)

    def __init__(self, customer_id: str, name: str, stages: list[dict[str, Any]]) -> None:
        self.customer_id = customer_id
        self.name = name
        self.stages: dict[str, Stage] = {
            s["stage_id"]: Stage(s["stage_id"], s["name"], s["probability"], s["category"])
            for s in stages
        }
        # Active stages in order; retired stages keep their record but leave the order.
        self.order: list[str] = [s["stage_id"] for s in stages]

    @classmethod
    def define(cls, name: str, stages: list[Stage]) -> Pipeline:
        ids = [s.stage_id for s in stages]
        if len(set(ids)) != len(ids):
            raise ValidationFailed.of("stages", "stage ids must be unique")
        cls._check_shape([s.category for s in stages], "stages")
        return cls._create(
            cls.Defined, customer_id="", name=name, stages=[_stage_fields(s) for s in stages]
        )

    @staticmethod
    def _check_shape(categories: list[str], field: str) -> None:
        if not any(c in OPEN_CATEGORIES for c in categories):
            raise ValidationFailed.of(field, "a pipeline needs at least one open stage")
        if CLOSED_WON not in categories:
            raise ValidationFailed.of(field, "a pipeline needs a closed-won stage")
        if CLOSED_LOST not in categories:
            raise ValidationFailed.of(field, "a pipeline needs a closed-lost stage")

    # -- queries

    def stage(self, stage_id: str, field: str = "stage_id") -> Stage:
        try:
            return self.stages[stage_id]
        except KeyError:
            raise ValidationFailed.of(
                field, f"{stage_id!r} is not a stage of pipeline {self.name!r}"
            ) from None

    def active_stage(self, stage_id: str, field: str = "stage_id") -> Stage:
        stage = self.stage(stage_id, field)
        if stage.retired:
            raise ValidationFailed.of(field, f"stage {stage_id!r} is retired")
        return stage

    def ordered_stages(self) -> list[Stage]:
        """Active stages in their order, then retired ones."""
        retired = [s for s in self.stages.values() if s.retired]
        return [self.stages[s] for s in self.order] + retired

    def position(self, stage_id: str) -> int | None:
        try:
            return self.order.index(stage_id)
        except ValueError:
            return None

    def first_open_stage(self) -> Stage:
        return next(self.stages[s] for s in self.order if self.stages[s].is_open)

    def closing_stage(self, category: str) -> Stage:
        return next(self.stages[s] for s in self.order if self.stages[s].category == category)

    # -- commands

    def add_stage(self, stage: Stage, position: int | None = None) -> None:
        if stage.stage_id in self.stages:
            raise ValidationFailed.of(
                "stage.stage_id", f"{stage.stage_id!r} is or was already a stage of this pipeline"
            )
        if position is None:
            position = len(self.order)
        if not 0 <= position <= len(self.order):
            raise ValidationFailed.of("position", f"must be from 0 to {len(self.order)}")
        self.trigger_event(
            self.StageAdded, customer_id="", position=position, **_stage_fields(stage)
        )

    def rename_stage(self, stage_id: str, name: str) -> None:
        stage = self.active_stage(stage_id)
        if stage.name != name:
            self.trigger_event(self.StageRenamed, customer_id="", stage_id=stage_id, name=name)

    def change_stage_settings(self, stage_id: str, probability: Decimal, category: str) -> None:
        stage = self.active_stage(stage_id)
        if stage.is_open != (category in OPEN_CATEGORIES) or (
            not stage.is_open and category != stage.category
        ):
            raise RuleViolated(
                "a stage's category may only change among the open categories "
                f"({', '.join(OPEN_CATEGORIES)}); closing stages keep theirs"
            )
        if (stage.probability, stage.category) != (probability, category):
            self.trigger_event(
                self.StageSettingsChanged,
                customer_id="",
                stage_id=stage_id,
                probability=probability,
                category=category,
            )

    def reorder_stages(self, stage_ids: list[str]) -> None:
        if sorted(stage_ids) != sorted(self.order) or len(set(stage_ids)) != len(stage_ids):
            raise ValidationFailed.of(
                "stage_ids", "must name every active stage of the pipeline exactly once"
            )
        if stage_ids != self.order:
            self.trigger_event(self.StagesReordered, customer_id="", stage_ids=list(stage_ids))

    def retire_stage(self, stage_id: str) -> None:
        stage = self.active_stage(stage_id)
        remaining = [self.stages[s].category for s in self.order if s != stage_id]
        try:
            self._check_shape(remaining, "stage_id")
        except ValidationFailed as refused:
            raise RuleViolated(
                f"stage {stage_id!r} cannot be retired: {refused.errors[0].message}"
            ) from None
        self.trigger_event(self.StageRetired, customer_id="", stage_id=stage.stage_id)
