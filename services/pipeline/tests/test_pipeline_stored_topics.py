"""Events stored before the domain became a package still load.

They name their classes under the old module (`crm_pipeline.domain:Lead.Created`);
the classes re-exported by `crm_pipeline.domain` keep those topics resolving.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from crm_common.settings import Settings
from crm_pipeline.application import PipelineService, create_application
from crm_pipeline.domain import Lead


def sqlite_settings(data_dir: Path) -> Settings:
    return Settings(
        service="pipeline",
        data_dir=data_dir,
        bind_host="127.0.0.1",
        grpc_port=0,
        http_port=0,
        event_store="sqlite",
    )


async def test_an_event_stored_under_the_old_module_topic_loads(tmp_path: Path) -> None:
    app = create_application(sqlite_settings(tmp_path))
    lead = Lead.create(
        family_name="Byron",
        email="ada@example.org",
        source="event",
        owner="ann",
        at=datetime(2026, 1, 5, 9, 0, tzinfo=UTC),
    )
    lead.qualify(80, datetime(2026, 1, 6, 9, 0, tzinfo=UTC))
    stored = [app.mapper.to_stored_event(e) for e in lead.collect_events()]
    assert stored[0].topic == "crm_pipeline.domain.leads:Lead.Created"
    old = [replace(s, topic=s.topic.replace("domain.leads:", "domain:")) for s in stored]
    assert old[0].topic == "crm_pipeline.domain:Lead.Created"
    app.recorder.insert_events(old)
    app.close()

    service = PipelineService(create_application(sqlite_settings(tmp_path)))
    try:
        loaded = await service.get_lead(str(lead.id))
        assert (loaded.family_name, loaded.status, loaded.score) == ("Byron", "qualified", 80)
    finally:
        service.close()
