"""Extended negotiation items (PS3.7 Annex D.3.3): offer, answer, finalise."""

from __future__ import annotations

import pytest

import dicomnet
from dicomnet.proto.contexts import VERIFICATION, PresentationContext, negotiate_as_acceptor
from dicomnet.proto.extended import (
    AsyncOperationsWindowNegotiation,
    SOPClassExtendedNegotiations,
    UserIdentityNegotiation,
)
from dicomnet.proto.pdu import (
    AAssociateRQ,
    AsyncOperationsWindow,
    PresentationContextRQ,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UserIdentityRQ,
    UserInformation,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
BASE = UserInformation(max_length=16384, implementation_class_uid="1.2.3")


def test_window_of_one_is_never_sent() -> None:
    assert AsyncOperationsWindowNegotiation(1, 1).offer(BASE) == BASE


@pytest.mark.parametrize(
    ("requestor", "acceptor", "expected_ac", "requestor_result"),
    [
        ((5, 3), (2, 4), AsyncOperationsWindow(2, 4), (4, 2)),
        ((0, 0), (3, 3), AsyncOperationsWindow(3, 3), (3, 3)),
        ((4, 1), (1, 1), None, (1, 1)),
        ((10, 10), (0, 0), AsyncOperationsWindow(10, 10), (10, 10)),
    ],
)
def test_window_negotiation_limits_both_ways(
    requestor: tuple[int, int],
    acceptor: tuple[int, int],
    expected_ac: AsyncOperationsWindow | None,
    requestor_result: tuple[int, int],
) -> None:
    ours = AsyncOperationsWindowNegotiation(*requestor)
    rq = ours.offer(BASE)
    assert rq.async_operations_window == AsyncOperationsWindow(*requestor)
    theirs = AsyncOperationsWindowNegotiation(*acceptor)
    ac = theirs.answer(rq, BASE)
    assert ac.async_operations_window == expected_ac
    ours.finalise(rq, ac)
    assert (ours.invoked, ours.performed) == requestor_result


def test_user_identity_positive_response_only_when_asked() -> None:
    asked = UserIdentityRQ(2, True, b"alice", b"secret")
    rq = UserIdentityNegotiation(asked).offer(BASE)
    assert rq.user_identity_rq == asked
    ac = UserIdentityNegotiation(server_response=b"token").answer(rq, BASE)
    assert ac.user_identity_ac is not None and ac.user_identity_ac.server_response == b"token"
    requestor = UserIdentityNegotiation(asked)
    requestor.finalise(rq, ac)
    assert requestor.server_response == b"token"
    silent = UserIdentityNegotiation(UserIdentityRQ(1, False, b"bob")).offer(BASE)
    answer = UserIdentityNegotiation(server_response=b"x").answer(silent, BASE)
    assert answer.user_identity_ac is None


def test_sop_class_extended_answers_only_supported_classes() -> None:
    offered = (
        SOPClassExtendedNegotiation(CT, b"\x01"),
        SOPClassExtendedNegotiation("1.2.840.10008.5.1.4.1.2.2.1", b"\x01\x01"),
    )
    common = (SOPClassCommonExtendedNegotiation(CT, "1.2.840.10008.4.2"),)
    requestor = SOPClassExtendedNegotiations(offered, common)
    rq = requestor.offer(BASE)
    acceptor = SOPClassExtendedNegotiations(supported={"1.2.840.10008.5.1.4.1.2.2.1": b"\x01\x00"})
    ac = acceptor.answer(rq, BASE)
    assert acceptor.common == common
    assert [i.sop_class_uid for i in ac.sop_class_extended] == ["1.2.840.10008.5.1.4.1.2.2.1"]
    requestor.finalise(rq, ac)
    assert requestor.accepted == {"1.2.840.10008.5.1.4.1.2.2.1": b"\x01\x00"}


def test_acceptor_negotiation_results_and_roles() -> None:
    rq = AAssociateRQ(
        "PACS",
        "SCU",
        (
            PresentationContextRQ(1, VERIFICATION, ("1.2.840.10008.1.2",)),
            PresentationContextRQ(3, "1.2.3.4", ("1.2.840.10008.1.2",)),
            PresentationContextRQ(5, CT, ("1.2.840.10008.1.2.4.50",)),
            PresentationContextRQ(7, CT, ("9.9", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2")),
        ),
        BASE.__class__(
            max_length=32768,
            implementation_class_uid="1.2.3",
            role_selections=(RoleSelection(CT, True, True),),
        ),
    )
    supported = {
        VERIFICATION: PresentationContext(VERIFICATION, ("1.2.840.10008.1.2",)),
        CT: PresentationContext(CT, ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"), True, True),
    }
    result = negotiate_as_acceptor(
        rq,
        supported,
        max_pdu_length=65536,
        implementation_class_uid="1.2.3.4",
        implementation_version_name="X",
    )
    by_id = {c.context_id: c for c in result.response.presentation_contexts}
    assert by_id[1].result == 0 and by_id[1].transfer_syntax == "1.2.840.10008.1.2"
    assert by_id[3].result == 3  # abstract syntax not supported
    assert by_id[5].result == 4  # transfer syntaxes not supported
    assert by_id[7].result == 0 and by_id[7].transfer_syntax == "1.2.840.10008.1.2.1"
    assert result.contexts[7].we_are_scu and result.contexts[7].we_are_scp
    assert result.response.user_information.role_selections == (RoleSelection(CT, True, True),)
    assert result.peer_max_pdu_length == 32768
    assert result.response.user_information.max_length == 65536


@pytest.mark.anyio
@pytest.mark.timeout(30)
async def test_extended_negotiation_over_loopback() -> None:
    ae = dicomnet.AE("PACS")
    seen: list[UserIdentityRQ | None] = []

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> bytes:
        seen.append(request.user_identity)
        return b"welcome"

    identity = UserIdentityRQ(2, True, b"alice", b"pw")
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect(
            "127.0.0.1",
            server.port,
            contexts=[PresentationContext(VERIFICATION)],
            user_identity=identity,
            async_operations_window=(4, 4),
        ) as assoc:
            assert await assoc.echo() == 0
            assert assoc.extended.user_identity.server_response == b"welcome"
            # The server performs one operation at a time unless configured otherwise.
            assert assoc.extended.async_operations_window.invoked == 1
    assert seen == [identity]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_sop_class_extended_answers_each_byte_with_what_both_support() -> None:
    find = "1.2.840.10008.5.1.4.1.2.2.1"
    rq = SOPClassExtendedNegotiations((SOPClassExtendedNegotiation(find, b"\x00\x01\x01"),))
    asked = rq.offer(BASE)
    acceptor = SOPClassExtendedNegotiations(supported={find: b"\x01\x01"})
    ac = acceptor.answer(asked, BASE)
    assert [i.service_class_application_information for i in ac.sop_class_extended] == [
        b"\x00\x01"  # not relational (not asked), combined date-time (asked and supported)
    ]
    assert acceptor.accepted == {find: b"\x00\x01"}
