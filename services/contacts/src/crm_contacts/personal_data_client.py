"""The other services' parts of a person's export, asked over gRPC.

Each service of the platform that holds data about people serves
`crm.privacy.v1.PersonalDataService/ExportPersonalData`. Contacts calls every
one of them as the platform (its service token) acting for the admin who
asked (`x-crm-acting-user`, so the callee checks the admin's roles too and its
audit names them), at the addresses the settings give (`grpc_target`, as for
every other client). A service that does not answer, or answers with
anything but a JSON object, fails the whole export with `Unavailable` naming
it: an incomplete export must never look complete.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import grpc

from crm.privacy.v1 import privacy_pb2, privacy_pb2_grpc
from crm_common.auth.issuer import ServiceCredentials
from crm_common.clients import call_metadata, service_channel, service_credentials
from crm_common.errors import Unavailable
from crm_common.registry import SERVICES
from crm_common.settings import Settings

#: The services whose parts an export gathers, in the document's order.
EXPORTED_SERVICES: tuple[str, ...] = tuple(
    s.name for s in SERVICES if s.name != "contacts" and not s.planned
)
DEFAULT_TIMEOUT = 15.0


class PersonalDataClients:
    """`ExportPersonalData` of every other service (see the module)."""

    def __init__(
        self,
        settings: Settings,
        services: Sequence[str] = EXPORTED_SERVICES,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.services = tuple(services)
        self.timeout = timeout
        self._credentials: ServiceCredentials | None = None
        self._channels: dict[str, grpc.aio.Channel] = {}

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if self._credentials is None:
            try:
                self._credentials = service_credentials(self.settings)
            except RuntimeError as error:
                raise Unavailable(f"the export cannot call the other services: {error}") from None
        return call_metadata(self._credentials)

    def _stub(self, service: str) -> privacy_pb2_grpc.PersonalDataServiceStub:
        channel = self._channels.get(service)
        if channel is None:
            channel = service_channel(self.settings.grpc_target(service), self.settings)
            self._channels[service] = channel
        return privacy_pb2_grpc.PersonalDataServiceStub(channel)  # type: ignore[no-untyped-call]

    async def _one(
        self, service: str, contact_id: str, metadata: tuple[tuple[str, str], ...]
    ) -> dict[str, Any]:
        try:
            reply = await self._stub(service).ExportPersonalData(
                privacy_pb2.ExportPersonalDataRequest(contact_id=contact_id),
                timeout=self.timeout,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as error:
            raise Unavailable(
                f"the {service} service did not answer the export "
                f"({error.code().name}: {error.details() or 'no details'}); "
                "the export is incomplete and was not made"
            ) from None
        try:
            document = json.loads(reply.document_json)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            raise Unavailable(
                f"the {service} service answered the export with no JSON object; "
                "the export is incomplete and was not made"
            )
        return document

    async def export(self, contact_id: str) -> dict[str, dict[str, Any]]:
        """Every other service's part, by service; `Unavailable` naming the services
        that did not answer."""
        if not self.services:
            return {}
        metadata = self._metadata()
        results = await asyncio.gather(
            *(self._one(s, contact_id, metadata) for s in self.services),
            return_exceptions=True,
        )
        failed = [
            (s, r)
            for s, r in zip(self.services, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            unexpected = [r for _, r in failed if not isinstance(r, Unavailable)]
            if unexpected:
                raise unexpected[0]
            if len(failed) == 1:
                raise failed[0][1]
            names = ", ".join(s for s, _ in failed)
            raise Unavailable(
                f"the services {names} did not answer the export; "
                "the export is incomplete and was not made"
            )
        return {s: r for s, r in zip(self.services, results, strict=True) if isinstance(r, dict)}

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel in channels.values():
            await channel.close()
