"""Hypothesis strategies for every PDU, item and sub-item (PS3.8 §9.3, PS3.7 Annex D)
and for every DIMSE message type (PS3.7 §9.3).

Every value drawn here survives encode -> decode unchanged: text fields carry no
padding characters at their ends, UIDs are digits and dots, context IDs are odd.
"""

from __future__ import annotations

import string

from hypothesis import strategies as st

from dicomnet.proto import dimse
from dicomnet.proto.pdu import (
    AAbort,
    AAssociateAC,
    AAssociateRJ,
    AAssociateRQ,
    AReleaseRP,
    AReleaseRQ,
    AsyncOperationsWindow,
    PDataTF,
    PresentationContextAC,
    PresentationContextRQ,
    PresentationDataValue,
    RoleSelection,
    SOPClassCommonExtendedNegotiation,
    SOPClassExtendedNegotiation,
    UnknownSubItem,
    UserIdentityAC,
    UserIdentityRQ,
    UserInformation,
)

# --- scalar fields ---------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)

# PS3.5 §9.1: components of digits without leading zeros, separated by dots, at most 64.
# At most 1 + 5 * 11 = 56 characters.
_uid_component = st.integers(0, 10**9).map(str)
uids = st.tuples(st.sampled_from(["1", "2"]), st.lists(_uid_component, min_size=1, max_size=5)).map(
    lambda t: ".".join([t[0], *t[1]])
)

# PS3.5 AE VR: up to 16 characters of the default repertoire, no backslash, no control
# characters; leading and trailing spaces are not significant (so none are drawn).
_ae_chars = "".join(c for c in string.printable if c not in "\\\t\n\r\x0b\x0c")
ae_titles = st.text(alphabet=_ae_chars, min_size=1, max_size=16).filter(
    lambda s: s == s.strip(" ") and s != ""
)
# Implementation Version Name (PS3.7 §D.3.3.2): 1 to 16 characters, trailing padding dropped.
version_names = ae_titles

odd_context_ids = st.integers(0, 127).map(lambda n: 2 * n + 1)
small_bytes = st.binary(max_size=64)

# --- items and sub-items ---------------------------------------------------------------------

presentation_contexts_rq = st.builds(
    PresentationContextRQ,
    context_id=odd_context_ids,
    abstract_syntax=uids,
    transfer_syntaxes=st.lists(uids, min_size=1, max_size=4).map(tuple),
)


@st.composite
def presentation_contexts_ac(draw: st.DrawFn) -> PresentationContextAC:
    result = draw(st.integers(0, 4))
    # A rejected context may leave the transfer syntax out (decoded as "").
    syntax = draw(uids) if result == 0 else draw(st.one_of(uids, st.just("")))
    return PresentationContextAC(draw(odd_context_ids), result, syntax)


async_operations_windows = st.builds(AsyncOperationsWindow, u16, u16)
role_selections = st.builds(RoleSelection, uids, st.booleans(), st.booleans())
sop_class_extended = st.builds(SOPClassExtendedNegotiation, uids, small_bytes)
sop_class_common_extended = st.builds(
    SOPClassCommonExtendedNegotiation,
    uids,
    uids,
    st.lists(uids, max_size=3).map(tuple),
)
user_identities_rq = st.builds(
    UserIdentityRQ,
    identity_type=st.integers(1, 5),
    positive_response_requested=st.booleans(),
    primary_field=small_bytes,
    secondary_field=small_bytes,
)
user_identities_ac = st.builds(UserIdentityAC, small_bytes)
_KNOWN_SUB_ITEMS = range(0x51, 0x5A)
unknown_sub_items = st.builds(
    UnknownSubItem,
    st.integers(0, 0xFF).filter(lambda t: t not in _KNOWN_SUB_ITEMS),
    small_bytes,
)


def _optional(strategy: st.SearchStrategy) -> st.SearchStrategy:  # type: ignore[type-arg]
    return st.none() | strategy


user_informations = st.builds(
    UserInformation,
    max_length=_optional(u32),
    implementation_class_uid=_optional(uids),
    implementation_version_name=_optional(version_names),
    async_operations_window=_optional(async_operations_windows),
    role_selections=st.lists(role_selections, max_size=3).map(tuple),
    sop_class_extended=st.lists(sop_class_extended, max_size=2).map(tuple),
    sop_class_common_extended=st.lists(sop_class_common_extended, max_size=2).map(tuple),
    user_identity_rq=_optional(user_identities_rq),
    user_identity_ac=_optional(user_identities_ac),
    unknown=st.lists(unknown_sub_items, max_size=2).map(tuple),
)

# --- PDUs ------------------------------------------------------------------------------------

associate_rqs = st.builds(
    AAssociateRQ,
    called_ae_title=ae_titles,
    calling_ae_title=ae_titles,
    presentation_contexts=st.lists(presentation_contexts_rq, max_size=4).map(tuple),
    user_information=user_informations,
    application_context_name=uids,
    protocol_version=u16,
)
associate_acs = st.builds(
    AAssociateAC,
    called_ae_title=ae_titles,
    calling_ae_title=ae_titles,
    presentation_contexts=st.lists(presentation_contexts_ac(), max_size=4).map(tuple),
    user_information=user_informations,
    application_context_name=uids,
    protocol_version=u16,
)
associate_rjs = st.builds(AAssociateRJ, u8, u8, u8)
pdvs = st.builds(
    PresentationDataValue,
    context_id=odd_context_ids,
    is_command=st.booleans(),
    is_last=st.booleans(),
    data=st.binary(max_size=256),
)
p_data_tfs = st.builds(PDataTF, st.lists(pdvs, min_size=1, max_size=5).map(tuple))
release_rqs = st.just(AReleaseRQ())
release_rps = st.just(AReleaseRP())
aborts = st.builds(AAbort, u8, u8)

pdus = st.one_of(
    associate_rqs,
    associate_acs,
    associate_rjs,
    p_data_tfs,
    release_rqs,
    release_rps,
    aborts,
)


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with a few random edits: byte changes, cuts, insertions, a rewritten length."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["set", "delete", "insert", "truncate", "u16", "u32"]))
        if not buf:
            kind = "insert"
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "set":
            buf[pos] = draw(u8)
        elif kind == "delete":
            del buf[pos : pos + draw(st.integers(1, 8))]
        elif kind == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "u16":
            buf[pos : pos + 2] = draw(u16).to_bytes(2, "big")
        else:
            buf[pos : pos + 4] = draw(u32).to_bytes(4, "big")
    return bytes(buf)


# --- DIMSE messages --------------------------------------------------------------------------

message_ids = st.integers(1, 0xFFFF)
# LO (PS3.5 Table 6.2-1): up to 64 characters; padding at either end is not significant.
_lo_chars = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "\\")
long_strings = st.text(alphabet=_lo_chars, min_size=1, max_size=64).filter(
    lambda s: s == s.strip(" ")
)
tags = st.lists(u32, min_size=1, max_size=4).map(tuple)
counts = _optional(u16)

dimse_messages = st.one_of(
    st.builds(dimse.CEchoRQ, message_ids, uids),
    st.builds(
        dimse.CEchoRSP,
        message_ids,
        u16,
        uids,  # None would decode as the Verification default (see test_dimse)
        _optional(long_strings),
    ),
    st.builds(
        dimse.CStoreRQ,
        message_ids,
        uids,
        uids,
        st.sampled_from([0, 1, 2]),
        _optional(ae_titles),
        _optional(message_ids),
    ),
    st.builds(
        dimse.CStoreRSP,
        message_ids,
        u16,
        _optional(uids),
        _optional(uids),
        _optional(long_strings),
        _optional(tags),
    ),
    st.builds(dimse.CFindRQ, message_ids, uids, st.sampled_from([0, 1, 2])),
    st.builds(
        dimse.CFindRSP,
        message_ids,
        u16,
        _optional(uids),
        _optional(long_strings),
        _optional(tags),
    ),
    st.builds(dimse.CGetRQ, message_ids, uids, st.sampled_from([0, 1, 2])),
    st.builds(
        dimse.CGetRSP,
        message_ids,
        u16,
        _optional(uids),
        counts,
        counts,
        counts,
        counts,
        _optional(long_strings),
    ),
    st.builds(dimse.CMoveRQ, message_ids, uids, ae_titles, st.sampled_from([0, 1, 2])),
    st.builds(
        dimse.CMoveRSP,
        message_ids,
        u16,
        _optional(uids),
        counts,
        counts,
        counts,
        counts,
        _optional(long_strings),
    ),
    st.builds(dimse.CCancelRQ, message_ids),
)


def _n_response(cls: type, *extra: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """An N-*-RSP: message ID, status, optional UIDs, `extra`, optional comment and ID."""
    return st.builds(
        cls,
        message_ids,
        u16,
        _optional(uids),
        _optional(uids),
        *extra,
        _optional(long_strings),
        _optional(u16),
    )


# PS3.7 §10.3: every DIMSE-N message type.
n_messages = st.one_of(
    st.builds(dimse.NEventReportRQ, message_ids, uids, uids, u16),
    _n_response(dimse.NEventReportRSP, _optional(u16)),
    st.builds(dimse.NGetRQ, message_ids, uids, uids, _optional(tags)),
    _n_response(dimse.NGetRSP, _optional(tags)),
    st.builds(dimse.NSetRQ, message_ids, uids, uids),
    _n_response(dimse.NSetRSP, _optional(tags)),
    st.builds(dimse.NActionRQ, message_ids, uids, uids, u16),
    _n_response(dimse.NActionRSP, _optional(u16)),
    st.builds(dimse.NCreateRQ, message_ids, uids, _optional(uids)),
    _n_response(dimse.NCreateRSP, _optional(tags)),
    st.builds(dimse.NDeleteRQ, message_ids, uids, uids),
    _n_response(dimse.NDeleteRSP),
)
dimse_messages = st.one_of(dimse_messages, n_messages)
