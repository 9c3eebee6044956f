"""Contexts proposed for sending instances, their running count, and the acceptor's
answers to a repeated proposal."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import dicomnet
from dicomnet.errors import ProtocolError
from dicomnet.proto.contexts import (
    DEFAULT_TRANSFER_SYNTAXES,
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    VERIFICATION,
    ContextAnswers,
    ContextCount,
    Negotiated,
    PresentationContext,
    accepted_as_requestor,
    build_requestor_contexts,
    contexts_for_instances,
    negotiate_as_acceptor,
)
from dicomnet.proto.pdu import (
    AAssociateAC,
    AAssociateRQ,
    PDUType,
    PresentationContextAC,
    PresentationContextRQ,
    RoleSelection,
    UserInformation,
    decode_pdu,
)
from dicomnet.services.qr import STUDY_ROOT_FIND

JPEG = "1.2.840.10008.1.2.4.50"
CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"


def test_one_context_per_pair_plus_a_conversion_fallback() -> None:
    pairs = [(CT, UNCOMPRESSED_TRANSFER_SYNTAXES[1]), (CT, JPEG), (CT, JPEG), (MR, None)]
    contexts = contexts_for_instances(pairs)
    assert [(c.abstract_syntax, c.transfer_syntaxes) for c in contexts] == [
        (CT, (UNCOMPRESSED_TRANSFER_SYNTAXES[1],)),
        (CT, (JPEG,)),
        (MR, DEFAULT_TRANSFER_SYNTAXES),
        (CT, UNCOMPRESSED_TRANSFER_SYNTAXES),
    ]


def test_a_compressed_instance_gets_an_uncompressed_context_to_convert_to() -> None:
    contexts = contexts_for_instances([(MR, JPEG)])
    assert [(c.abstract_syntax, c.transfer_syntaxes) for c in contexts] == [
        (MR, (JPEG,)),
        (MR, UNCOMPRESSED_TRANSFER_SYNTAXES),
    ]


def test_a_preferred_syntax_is_proposed_first_for_each_class() -> None:
    rle = "1.2.840.10008.1.2.5"
    contexts = contexts_for_instances([(CT, JPEG), (MR, rle)], preferred=rle)
    assert [(c.abstract_syntax, c.transfer_syntaxes) for c in contexts] == [
        (CT, (rle,)),
        (MR, (rle,)),
        (CT, (JPEG,)),
        (CT, UNCOMPRESSED_TRANSFER_SYNTAXES),
        (MR, UNCOMPRESSED_TRANSFER_SYNTAXES),
    ]


pair = st.tuples(
    st.sampled_from([f"1.2.{i}" for i in range(8)]),
    st.sampled_from([*UNCOMPRESSED_TRANSFER_SYNTAXES, JPEG, None]),
)


@given(
    st.lists(pair, min_size=1, max_size=40),
    st.sampled_from([None, JPEG, UNCOMPRESSED_TRANSFER_SYNTAXES[0]]),
)
def test_running_count_agrees_with_the_contexts(
    pairs: list[tuple[str, str | None]], preferred: str | None
) -> None:
    count = ContextCount(preferred)
    for i, (sop, ts) in enumerate(pairs):
        expected = len(contexts_for_instances(pairs[: i + 1], preferred))
        assert count.with_(sop, ts) == expected
        count.add(sop, ts)
    assert len(count) == len(contexts_for_instances(pairs, preferred))


def _request(calling: str = "MODALITY") -> bytes:
    """An A-ASSOCIATE-RQ body, as a requestor sends it each time it connects."""
    rq = AAssociateRQ(
        called_ae_title="PACS",
        calling_ae_title=calling,
        presentation_contexts=(
            PresentationContextRQ(1, VERIFICATION, ("1.2.840.10008.1.2",)),
            PresentationContextRQ(3, CT, ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2")),
            PresentationContextRQ(5, MR, (JPEG,)),
        ),
        user_information=UserInformation(
            max_length=16384,
            implementation_class_uid="1.2.3",
            role_selections=(RoleSelection(CT, True, True),),
        ),
    )
    return rq.encode()[6:]


def test_a_repeated_request_is_answered_once_and_alike() -> None:
    first = decode_pdu(PDUType.A_ASSOCIATE_RQ, _request())
    again = decode_pdu(PDUType.A_ASSOCIATE_RQ, bytearray(_request()))
    assert again == first and again is not first  # nothing kept between decodes
    assert isinstance(first, AAssociateRQ) and isinstance(again, AAssociateRQ)
    supported = {
        VERIFICATION: PresentationContext(VERIFICATION, DEFAULT_TRANSFER_SYNTAXES),
        CT: PresentationContext(CT, DEFAULT_TRANSFER_SYNTAXES, scu_role=True, scp_role=False),
    }

    def negotiate(answers: ContextAnswers | None) -> Negotiated:
        return negotiate_as_acceptor(
            first,
            supported,
            max_pdu_length=65536,
            implementation_class_uid="1.2",
            implementation_version_name="X",
            answers=answers,
        )

    afresh = negotiate(None)
    answers = ContextAnswers()
    remembered = [negotiate(answers)]
    first = again  # the same proposal in another object: answered from memory
    remembered.append(negotiate(answers))
    remembered.append(negotiate(answers))  # the same objects again: found by identity
    for negotiated in remembered:
        assert negotiated == afresh
    results = [n.response.presentation_contexts for n in remembered]
    assert results[0] is results[1] is results[2]  # answered from memory after the first
    assert remembered[0].contexts is not remembered[1].contexts  # each its own mapping
    assert [c.result for c in afresh.response.presentation_contexts] == [0, 0, 3]
    assert afresh.contexts[3].we_are_scp and not afresh.contexts[3].we_are_scu
    assert afresh.response.user_information.role_selections == (RoleSelection(CT, True, False),)


def test_a_malformed_request_is_refused_every_time() -> None:
    body = bytearray(_request())
    body[-3] ^= 0xFF  # break the user information item's length
    for _ in range(2):
        with pytest.raises(ProtocolError):
            decode_pdu(PDUType.A_ASSOCIATE_RQ, bytes(body))


async def _handler(request: object) -> int:  # pragma: no cover - never called
    return 0


def test_an_ae_answers_with_its_handlers_as_they_are_now() -> None:
    ae = dicomnet.AE("PACS")
    ae.on_store(_handler)
    supported = ae.supported_contexts()
    assert CT in supported and STUDY_ROOT_FIND not in supported
    supported.clear()  # the caller's copy
    assert CT in ae.supported_contexts()
    ae.on_find(_handler)  # a handler added later is negotiated from then on
    assert STUDY_ROOT_FIND in ae.supported_contexts()
    ae.contexts = [PresentationContext(MR)]
    assert list(ae.supported_contexts()) == [MR]


def test_equal_proposals_are_built_once_and_lists_still_work() -> None:
    """A requestor proposing the same contexts again (the defaults, a pool's) gets the same
    items, so their encoding is remembered too; transfer syntaxes given as a list (not
    hashable) are built each time."""
    proposal = dicomnet.default_contexts()
    first = build_requestor_contexts(proposal)
    again = build_requestor_contexts(list(dicomnet.default_contexts()))
    assert again[0] is first[0] and again[1] is first[1]
    listed = [PresentationContext("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]  # type: ignore[arg-type]
    items, roles = build_requestor_contexts(listed)
    assert items == (PresentationContextRQ(1, "1.2.840.10008.1.1", ("1.2.840.10008.1.2",)),)
    assert roles == ()


def test_the_same_answer_is_read_once_and_each_caller_gets_its_own_mapping() -> None:
    items, roles = build_requestor_contexts(
        [PresentationContext(VERIFICATION), PresentationContext("1.2.840.10008.5.1.4.1.1.2")]
    )
    user = UserInformation(max_length=16384, implementation_class_uid="1.2")
    one = (PresentationContextAC(1, 0, "1.2.840.10008.1.2"), PresentationContextAC(3, 3, ""))
    first = accepted_as_requestor(items, AAssociateAC("A", "B", one, user), roles)
    second = accepted_as_requestor(items, AAssociateAC("A", "B", one, user), roles)
    assert first == second and first is not second  # remembered, and a copy each time
    assert list(first) == [1]
    both = (one[0], PresentationContextAC(3, 0, "1.2.840.10008.1.2.1"))
    assert sorted(accepted_as_requestor(items, AAssociateAC("A", "B", both, user), roles)) == [1, 3]
