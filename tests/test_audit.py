"""Audit events (dicomnet.audit): the JSON-lines file, and what an AE records of each
association and operation (PS3.15 A.5.3 events)."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import anyio
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

import dicomnet
from dicomnet.audit import (
    NODE_AUTHENTICATION,
    AssociationEvent,
    AuditEvent,
    AuditLog,
    OperationEvent,
    SecurityAlert,
    outcome_of,
    security_alert,
)
from dicomnet.proto.contexts import STUDY_ROOT_FIND, VERIFICATION, PresentationContext

pytestmark = pytest.mark.timeout(60)

CT = "1.2.840.10008.5.1.4.1.1.2"
CT_FILE = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_outcome_indicators() -> None:
    assert [outcome_of(s) for s in (0x0000, 0xB000, 0x0107, 0xFE00, 0xA700, 0xC000, None)] == [
        0,
        4,
        4,
        4,
        8,
        8,
        12,
    ]


def test_audit_log_writes_private_json_lines_in_utc(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    # As `getpeercert()` gives it: the most general name first.
    certificate = {"subject": ((("organizationName", "H"),), (("commonName", "modality.example"),))}
    security_alert(
        log,
        NODE_AUTHENTICATION,
        "TLS handshake failed: certificate unknown",
        peer=("10.0.0.5", 40000),
        certificate=certificate,
    )
    # Flushed line by line: readable while the log is still open.
    lines = path.read_text().splitlines()
    assert len(lines) == 1
    log(AssociationEvent(kind="association-rejected", event_id="User Authentication", result=1))
    log.close()
    lines = path.read_text().splitlines()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    first, second = (json.loads(line) for line in lines)
    assert first["kind"] == "security-alert" and first["alert"] == "Node Authentication"
    assert first["certificate_subject"] == "CN=modality.example,O=H"
    assert first["peer_host"] == "10.0.0.5" and first["event_id"] == "Security Alert"
    when = datetime.fromisoformat(first["time"])
    assert when.utcoffset() == timedelta(0)
    assert abs(datetime.now(timezone.utc) - when) < timedelta(minutes=1)
    assert second["result"] == 1 and "user" not in second  # None fields left out


@pytest.mark.anyio
async def test_an_ae_audits_associations_and_operations() -> None:
    events: list[AuditEvent] = []

    def hook(event: AuditEvent) -> None:
        events.append(event)
        if len(events) == 2:
            raise RuntimeError("a failing hook must not stop anything")

    ae = dicomnet.AE("PACS", audit=hook)

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        return 0xA700  # out of resources

    @ae.on_find
    async def find(request: dicomnet.FindRequest):  # type: ignore[no-untyped-def]
        for name in ("A", "B"):
            match = Dataset()
            match.PatientName = name
            yield match

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "DOE^*"
    query.StudyDate = ""
    contexts = [
        PresentationContext(VERIFICATION),
        PresentationContext(CT),
        PresentationContext(STUDY_ROOT_FIND),
    ]
    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect(
                "127.0.0.1", server.port, aet="VIEWER", aec="PACS", contexts=contexts
            ) as assoc:
                assert await assoc.echo() == 0
                found = [ds async for ds in assoc.find(query)]
                assert len(found) == 2
                with pytest.raises(dicomnet.DimseError):
                    await assoc.store(CT_FILE)
            async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts) as assoc:
                await assoc.abort()
            with anyio.fail_after(10):
                while sum(isinstance(e, AssociationEvent) for e in events) < 4:
                    await anyio.sleep(0.01)
    kinds = [e.kind for e in events]
    assert kinds == [
        "association-accepted",
        "operation",
        "operation",
        "operation",
        "association-released",
        "association-accepted",
        "association-aborted",
    ]
    echo, query_event, stored = (e for e in events if isinstance(e, OperationEvent))
    assert (echo.service, echo.event_id, echo.outcome) == ("echo", "Application Activity", 0)
    assert query_event.event_id == "Query" and query_event.command == "C-FIND"
    assert query_event.status == 0 and query_event.sop_class_uid == STUDY_ROOT_FIND
    assert query_event.query == {
        "QueryRetrieveLevel": "STUDY",
        "PatientName": "DOE^*",
        "StudyDate": "",
    }
    assert stored.event_id == "DICOM Instances Transferred" and stored.action == "C"
    assert (stored.status, stored.outcome) == (0xA700, 8)
    assert stored.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert all(e.calling_ae == "VIEWER" and e.peer_host == "127.0.0.1" for e in events[:5])
    assert not any(isinstance(e, SecurityAlert) for e in events)
