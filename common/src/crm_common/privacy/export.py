"""The GDPR export, as every service serves it.

Each service that holds data about a person serves
`crm.privacy.v1.PersonalDataService/ExportPersonalData` with one function of
its own: given a contact id, a JSON-ready mapping of everything it holds
about that person (its records and their history, personal values opened).
Contacts gathers the answers of all of them into one document
(`ExportPerson`). The function runs off the event loop.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import date, datetime
from decimal import Decimal
from enum import Enum
from typing import Any
from uuid import UUID

from crm.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from crm_common.errors import ValidationFailed

#: contact id -> everything the service holds about the person.
Exporter = Callable[[str], Mapping[str, Any]]

SERVICE_NAME = privacy_pb2.DESCRIPTOR.services_by_name["PersonalDataService"].full_name
MAX_ID_LENGTH = 200


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal | UUID):
        return str(value)
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not exportable")


def export_json(document: Mapping[str, Any]) -> str:
    """The document as JSON (times ISO 8601, amounts as decimal text)."""
    return json.dumps(document, default=_plain, ensure_ascii=False, sort_keys=True)


def checked_contact_id(contact_id: str) -> str:
    contact_id = contact_id.strip()
    if not contact_id:
        raise ValidationFailed.of("contact_id", "required: the person's contact id")
    if len(contact_id) > MAX_ID_LENGTH or any(c.isspace() for c in contact_id):
        raise ValidationFailed.of("contact_id", "not a contact id")
    return contact_id


class PersonalDataServicer(privacy_pb2_grpc.PersonalDataServiceServicer):
    """`ExportPersonalData` of one service, answered by its `Exporter`."""

    def __init__(self, service: str, exporter: Exporter) -> None:
        self.service = service
        self.exporter = exporter

    async def ExportPersonalData(
        self, request: privacy_pb2.ExportPersonalDataRequest, context: Any
    ) -> privacy_pb2.ExportPersonalDataResponse:
        contact_id = checked_contact_id(request.contact_id)
        document = await asyncio.to_thread(self.exporter, contact_id)
        return privacy_pb2.ExportPersonalDataResponse(
            service=self.service, document_json=export_json(document)
        )


def personal_data_service(service: str, exporter: Exporter) -> Any:
    """The servicer as `crm_common.server.serve()` registers it (a `GrpcService`)."""
    from crm_common.server import GrpcService

    return GrpcService(
        PersonalDataServicer(service, exporter),
        privacy_pb2_grpc.add_PersonalDataServiceServicer_to_server,
        SERVICE_NAME,
    )
