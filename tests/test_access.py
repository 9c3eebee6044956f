"""Access control (dicomnet.access): the rule engine without sockets, the contexts of a
refused service rejected in the A-ASSOCIATE-AC (PS3.8 Table 9-18, result 1), and an AE
that applies it."""

from __future__ import annotations

from pathlib import Path

import anyio
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

import dicomnet
from dicomnet.access import ALL_SERVICES, AccessPolicy, AccessRule, load_access, restrict
from dicomnet.audit import AuditEvent, OperationEvent, SecurityAlert
from dicomnet.proto.contexts import (
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    VERIFICATION,
    PresentationContext,
    build_requestor_contexts,
    negotiate_as_acceptor,
)
from dicomnet.proto.pdu import AAssociateRQ, PresentationContextResult, UserInformation

pytestmark = pytest.mark.timeout(60)

CT = "1.2.840.10008.5.1.4.1.1.2"
MPPS = "1.2.840.10008.3.1.2.3.3"
CT_FILE = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


POLICY = AccessPolicy(
    (
        AccessRule.make(["echo"], calling="CT?", address="10.1.2.3"),
        AccessRule.make(["echo", "store"], calling=["CT*", "MR*"], address="10.0.0.0/8"),
        AccessRule.make(["all"], user="*", address=["192.168.0.0/16", "fd00::/8"]),
        AccessRule.make(["find"], calling="VIEWER"),
    )
)


@pytest.mark.parametrize(
    ("calling", "host", "user", "expected"),
    [
        ("CT1", "10.1.2.3", None, {"echo"}),  # the first matching rule wins
        ("CT12", "10.1.2.3", None, {"echo", "store"}),  # ? is one character
        ("MR_3T", "10.200.0.9", None, {"echo", "store"}),
        ("MR_3T", "::ffff:10.200.0.9", None, {"echo", "store"}),  # IPv4-mapped
        ("MR_3T", "11.0.0.1", None, set()),  # outside the network
        ("ANY", "192.168.4.4", "alice", set(ALL_SERVICES)),
        ("ANY", "192.168.4.4", None, set()),  # a rule with users needs one verified
        ("ANY", "fd00::17", "bob", set(ALL_SERVICES)),
        ("VIEWER", "172.16.0.1", None, {"find"}),
        ("VIEWER  ", "172.16.0.1", None, {"find"}),  # AE titles compared stripped
        ("viewer", "172.16.0.1", None, set()),  # case matters (PS3.5: AE is case-sensitive)
        ("CT1", "not-an-address", None, set()),
    ],
)
def test_rules(calling: str, host: str, user: str | None, expected: set[str]) -> None:
    assert POLICY.allowed(calling, host, user) == expected


def test_access_file(tmp_path: Path) -> None:
    path = tmp_path / "access.toml"
    path.write_text(
        '[[rule]]\ncalling = "STORE*"\naddress = "127.0.0.0/8"\nservices = ["echo", "store"]\n'
        '[[rule]]\nuser = ["alice"]\nservices = ["all"]\n'
    )
    policy = load_access(path)
    assert policy.allowed("STORESCU", "127.0.0.1") == {"echo", "store"}
    assert policy.allowed("X", "127.0.0.1", "alice") == ALL_SERVICES
    assert policy.allowed("X", "127.0.0.1") == frozenset()
    for bad, why in (
        ('[[rule]]\nservices = ["teleport"]\n', "unknown service"),
        ('[[rule]]\naddress = "10.0.0.300"\nservices = ["echo"]\n', "not an IP address"),
        ('[[rule]]\ncalling = "A"\n', "services"),
        ('[[rule]]\nservices = ["echo"]\nport = 4\n', "keys are"),
        ("[rules]\n", "only"),
        ("[[rule]\n", str(path)),
    ):
        path.write_text(bad)
        with pytest.raises(ValueError, match=why):
            load_access(path)


def _negotiated(roles: bool = False) -> object:
    contexts = [
        PresentationContext(VERIFICATION),
        PresentationContext(STUDY_ROOT_FIND),
        PresentationContext(STUDY_ROOT_GET),
        PresentationContext(CT, scu_role=True, scp_role=True if roles else None),
        PresentationContext(MPPS),
    ]
    proposed, asked = build_requestor_contexts(contexts)
    rq = AAssociateRQ(
        called_ae_title="PACS",
        calling_ae_title="MOD",
        presentation_contexts=proposed,
        user_information=UserInformation(max_length=16384, role_selections=asked),
    )
    supported = {
        uid: PresentationContext(uid, scu_role=True, scp_role=True)
        for uid in (VERIFICATION, STUDY_ROOT_FIND, STUDY_ROOT_GET, CT, MPPS)
    }
    return negotiate_as_acceptor(
        rq,
        supported,
        max_pdu_length=16384,
        implementation_class_uid="1.2.3",
        implementation_version_name="X",
    )


def test_restrict_rejects_the_contexts_of_refused_services() -> None:
    negotiated = _negotiated()
    assert len(negotiated.contexts) == 5  # type: ignore[attr-defined]
    kept, refused = restrict(negotiated, frozenset({"echo", "store"}))  # type: ignore[arg-type]
    assert sorted(c.abstract_syntax for c in kept.contexts.values()) == sorted([VERIFICATION, CT])
    assert sorted(refused) == sorted(
        [(STUDY_ROOT_FIND, "find"), (STUDY_ROOT_GET, "get"), (MPPS, "mpps")]
    )
    results = {r.context_id: r.result for r in kept.response.presentation_contexts}
    for context_id, result in results.items():
        expected = (
            PresentationContextResult.ACCEPTANCE
            if context_id in kept.contexts
            else PresentationContextResult.USER_REJECTION
        )
        assert result == expected
    same, none = restrict(negotiated, ALL_SERVICES)  # type: ignore[arg-type]
    assert same is negotiated and none == []


def test_restrict_keeps_the_get_role_of_storage_when_store_is_refused() -> None:
    negotiated = _negotiated(roles=True)
    ct = next(c for c in negotiated.contexts.values() if c.abstract_syntax == CT)  # type: ignore[attr-defined]
    assert ct.we_are_scp and ct.we_are_scu  # both roles granted by default
    kept, refused = restrict(negotiated, frozenset({"get"}))  # type: ignore[arg-type]
    ct = next(c for c in kept.contexts.values() if c.abstract_syntax == CT)
    assert ct.we_are_scu and not ct.we_are_scp  # sub-operations of a C-GET only
    roles = {r.sop_class_uid: r for r in kept.response.user_information.role_selections}
    assert (roles[CT].scu_role, roles[CT].scp_role) == (False, True)
    assert (CT, "store") not in refused
    _, refused = restrict(negotiated, frozenset({"echo"}))  # type: ignore[arg-type]
    assert (CT, "store") in refused


@pytest.mark.anyio
async def test_an_ae_refuses_the_services_a_peer_may_not_use() -> None:
    events: list[AuditEvent] = []
    policy = AccessPolicy(
        (
            AccessRule.make(["echo", "store"], calling="MODALITY", address="127.0.0.0/8"),
            AccessRule.make(["find"], calling="NOTHERE", address="10.0.0.0/8"),
        )
    )
    ae = dicomnet.AE("PACS", access=policy, audit=events.append)
    stored: list[str] = []

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        stored.append(request.sop_instance_uid)  # type: ignore[attr-defined]
        return 0

    @ae.on_find
    async def find(request: dicomnet.FindRequest):  # type: ignore[no-untyped-def]
        yield Dataset()

    query = Dataset()
    query.PatientID = "*"
    query.QueryRetrieveLevel = "STUDY"
    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            contexts = [PresentationContext(CT), PresentationContext(STUDY_ROOT_FIND)]
            async with dicomnet.connect(
                "127.0.0.1", server.port, aet="MODALITY", contexts=contexts
            ) as assoc:
                assert [c.abstract_syntax for c in assoc.accepted_contexts] == [CT]
                assert await assoc.store(CT_FILE) == 0
                with pytest.raises(dicomnet.NotNegotiatedError):
                    async for _ in assoc.find(query):
                        pass
            with pytest.raises(dicomnet.AssociationRejected) as rejected:  # no rule matches
                async with dicomnet.connect("127.0.0.1", server.port, aet="NOTHERE"):
                    pass
            assert (rejected.value.result, rejected.value.source) == (1, 1)
            # Only refused services proposed: nothing left, rejected.
            with pytest.raises(dicomnet.AssociationRejected):
                async with dicomnet.connect(
                    "127.0.0.1",
                    server.port,
                    aet="MODALITY",
                    contexts=[PresentationContext(STUDY_ROOT_FIND)],
                ):
                    pass
    assert len(stored) == 1
    alerts = [e for e in events if isinstance(e, SecurityAlert)]
    assert [a.alert for a in alerts] == ["Use of Restricted Function"] * 3
    assert alerts[0].service == "find" and alerts[0].calling_ae == "MODALITY"
    operations = [e for e in events if isinstance(e, OperationEvent)]
    assert [(o.service, o.command, o.status, o.outcome) for o in operations] == [
        ("store", "C-STORE", 0, 0)
    ]
    assert operations[0].sop_instance_uid == stored[0]
