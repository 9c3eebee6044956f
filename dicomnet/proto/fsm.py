"""The DICOM Upper Layer state machine as data: PS3.8 §9.2, Tables 9-9 and 9-10.

This module owns the states, events, actions and the state transition table.
`dicomnet.proto.ul.UpperLayer` looks every (state, event) pair up here and runs the
action it names; a pair absent from `TRANSITIONS` is listed in `UNREACHABLE`
with the reason it cannot happen (or why a local request there is refused).
"""

from __future__ import annotations

from enum import Enum, IntEnum

__all__ = ["ACTION_NEXT_STATES", "TRANSITIONS", "UNREACHABLE", "Action", "Event", "State"]


class State(IntEnum):
    """PS3.8 Table 9-9."""

    STA1 = 1  # Idle
    STA2 = 2  # Transport connection open (awaiting A-ASSOCIATE-RQ PDU)
    STA3 = 3  # Awaiting local A-ASSOCIATE response primitive
    STA4 = 4  # Awaiting transport connection opening to complete
    STA5 = 5  # Awaiting A-ASSOCIATE-AC or A-ASSOCIATE-RJ PDU
    STA6 = 6  # Association established and ready for data transfer
    STA7 = 7  # Awaiting A-RELEASE-RP PDU
    STA8 = 8  # Awaiting local A-RELEASE response primitive
    STA9 = 9  # Release collision requestor side; awaiting A-RELEASE response primitive
    STA10 = 10  # Release collision acceptor side; awaiting A-RELEASE-RP PDU
    STA11 = 11  # Release collision requestor side; awaiting A-RELEASE-RP PDU
    STA12 = 12  # Release collision acceptor side; awaiting A-RELEASE response primitive
    STA13 = 13  # Awaiting Transport Connection Close Indication


class Event(IntEnum):
    """PS3.8 Table 9-10 (events)."""

    EVT1 = 1  # A-ASSOCIATE request (local user)
    EVT2 = 2  # Transport connection confirm (local transport service)
    EVT3 = 3  # A-ASSOCIATE-AC PDU received
    EVT4 = 4  # A-ASSOCIATE-RJ PDU received
    EVT5 = 5  # Transport connection indication (local transport service)
    EVT6 = 6  # A-ASSOCIATE-RQ PDU received
    EVT7 = 7  # A-ASSOCIATE response primitive (accept)
    EVT8 = 8  # A-ASSOCIATE response primitive (reject)
    EVT9 = 9  # P-DATA request primitive
    EVT10 = 10  # P-DATA-TF PDU received
    EVT11 = 11  # A-RELEASE request primitive
    EVT12 = 12  # A-RELEASE-RQ PDU received
    EVT13 = 13  # A-RELEASE-RP PDU received
    EVT14 = 14  # A-RELEASE response primitive
    EVT15 = 15  # A-ABORT request primitive
    EVT16 = 16  # A-ABORT PDU received
    EVT17 = 17  # Transport connection closed indication
    EVT18 = 18  # ARTIM timer expired
    EVT19 = 19  # Unrecognized or invalid PDU received


class Action(str, Enum):
    """PS3.8 Table 9-6 .. 9-9 actions."""

    AE_1 = "AE-1"  # issue TRANSPORT CONNECT request
    AE_2 = "AE-2"  # send A-ASSOCIATE-RQ PDU
    AE_3 = "AE-3"  # issue A-ASSOCIATE confirmation (accept)
    AE_4 = "AE-4"  # issue A-ASSOCIATE confirmation (reject), close transport
    AE_5 = "AE-5"  # issue transport connection response, start ARTIM
    AE_6 = "AE-6"  # stop ARTIM; RQ acceptable -> indication (Sta3), else RJ + ARTIM (Sta13)
    AE_7 = "AE-7"  # send A-ASSOCIATE-AC PDU
    AE_8 = "AE-8"  # send A-ASSOCIATE-RJ PDU, start ARTIM
    DT_1 = "DT-1"  # send P-DATA-TF PDU
    DT_2 = "DT-2"  # issue P-DATA indication
    AR_1 = "AR-1"  # send A-RELEASE-RQ PDU
    AR_2 = "AR-2"  # issue A-RELEASE indication
    AR_3 = "AR-3"  # issue A-RELEASE confirmation, close transport
    AR_4 = "AR-4"  # send A-RELEASE-RP PDU, start ARTIM
    AR_5 = "AR-5"  # stop ARTIM
    AR_6 = "AR-6"  # issue P-DATA indication
    AR_7 = "AR-7"  # send P-DATA-TF PDU
    AR_8 = "AR-8"  # issue A-RELEASE indication (release collision): requestor Sta9, else Sta10
    AR_9 = "AR-9"  # send A-RELEASE-RP PDU
    AR_10 = "AR-10"  # issue A-RELEASE confirmation
    AA_1 = "AA-1"  # send A-ABORT PDU (service-user), (re)start ARTIM
    AA_2 = "AA-2"  # stop ARTIM if running, close transport
    AA_3 = "AA-3"  # issue A-ABORT / A-P-ABORT indication, close transport
    AA_4 = "AA-4"  # issue A-P-ABORT indication
    AA_5 = "AA-5"  # stop ARTIM
    AA_6 = "AA-6"  # ignore PDU
    AA_7 = "AA-7"  # send A-ABORT PDU
    AA_8 = "AA-8"  # send A-ABORT PDU (service-provider), issue A-P-ABORT indication, start ARTIM


S = State
E = Event
A = Action

ACTION_NEXT_STATES: dict[Action, tuple[State, ...]] = {
    A.AE_1: (S.STA4,),
    A.AE_2: (S.STA5,),
    A.AE_3: (S.STA6,),
    A.AE_4: (S.STA1,),
    A.AE_5: (S.STA2,),
    A.AE_6: (S.STA3, S.STA13),
    A.AE_7: (S.STA6,),
    A.AE_8: (S.STA13,),
    A.DT_1: (S.STA6,),
    A.DT_2: (S.STA6,),
    A.AR_1: (S.STA7,),
    A.AR_2: (S.STA8,),
    A.AR_3: (S.STA1,),
    A.AR_4: (S.STA13,),
    A.AR_5: (S.STA1,),
    A.AR_6: (S.STA7,),
    A.AR_7: (S.STA8,),
    A.AR_8: (S.STA9, S.STA10),
    A.AR_9: (S.STA11,),
    A.AR_10: (S.STA12,),
    A.AA_1: (S.STA13,),
    A.AA_2: (S.STA1,),
    A.AA_3: (S.STA1,),
    A.AA_4: (S.STA1,),
    A.AA_5: (S.STA1,),
    A.AA_6: (S.STA13,),
    A.AA_7: (S.STA13,),
    A.AA_8: (S.STA13,),
}


def _row(event: Event, cells: dict[State, Action]) -> dict[tuple[State, Event], Action]:
    return {(state, event): action for state, action in cells.items()}


# Sta6..Sta12: the states in which an association exists (or is being released).
_ESTABLISHED = (S.STA6, S.STA7, S.STA8, S.STA9, S.STA10, S.STA11, S.STA12)

TRANSITIONS: dict[tuple[State, Event], Action] = {
    **_row(E.EVT1, {S.STA1: A.AE_1}),
    **_row(E.EVT2, {S.STA4: A.AE_2}),
    **_row(
        E.EVT3,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AE_3, S.STA13: A.AA_6}
        | dict.fromkeys(_ESTABLISHED, A.AA_8),
    ),
    **_row(
        E.EVT4,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AE_4, S.STA13: A.AA_6}
        | dict.fromkeys(_ESTABLISHED, A.AA_8),
    ),
    **_row(E.EVT5, {S.STA1: A.AE_5}),
    **_row(
        E.EVT6,
        {S.STA2: A.AE_6, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA13: A.AA_7}
        | dict.fromkeys(_ESTABLISHED, A.AA_8),
    ),
    **_row(E.EVT7, {S.STA3: A.AE_7}),
    **_row(E.EVT8, {S.STA3: A.AE_8}),
    **_row(E.EVT9, {S.STA6: A.DT_1, S.STA8: A.AR_7}),
    **_row(
        E.EVT10,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA13: A.AA_6}
        | dict.fromkeys(_ESTABLISHED, A.AA_8)
        | {S.STA6: A.DT_2, S.STA7: A.AR_6},
    ),
    **_row(E.EVT11, {S.STA6: A.AR_1}),
    **_row(
        E.EVT12,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA13: A.AA_6}
        | dict.fromkeys(_ESTABLISHED, A.AA_8)
        | {S.STA6: A.AR_2, S.STA7: A.AR_8},
    ),
    **_row(
        E.EVT13,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA13: A.AA_6}
        | dict.fromkeys(_ESTABLISHED, A.AA_8)
        | {S.STA7: A.AR_3, S.STA10: A.AR_10, S.STA11: A.AR_3},
    ),
    **_row(E.EVT14, {S.STA8: A.AR_4, S.STA9: A.AR_9, S.STA12: A.AR_4}),
    **_row(
        E.EVT15,
        {S.STA3: A.AA_1, S.STA4: A.AA_2, S.STA5: A.AA_1} | dict.fromkeys(_ESTABLISHED, A.AA_1),
    ),
    **_row(
        E.EVT16,
        {S.STA2: A.AA_2, S.STA3: A.AA_3, S.STA5: A.AA_3, S.STA13: A.AA_2}
        | dict.fromkeys(_ESTABLISHED, A.AA_3),
    ),
    **_row(
        E.EVT17,
        {S.STA2: A.AA_5, S.STA3: A.AA_4, S.STA4: A.AA_4, S.STA5: A.AA_4, S.STA13: A.AR_5}
        | dict.fromkeys(_ESTABLISHED, A.AA_4),
    ),
    **_row(E.EVT18, {S.STA2: A.AA_2, S.STA13: A.AA_2}),
    **_row(
        E.EVT19,
        {S.STA2: A.AA_1, S.STA3: A.AA_8, S.STA5: A.AA_8, S.STA13: A.AA_7}
        | dict.fromkeys(_ESTABLISHED, A.AA_8),
    ),
}


def _unreachable() -> dict[tuple[State, Event], str]:
    reasons: dict[tuple[State, Event], str] = {}
    received = (E.EVT3, E.EVT4, E.EVT6, E.EVT10, E.EVT12, E.EVT13, E.EVT16, E.EVT19)
    local = (E.EVT1, E.EVT7, E.EVT8, E.EVT9, E.EVT11, E.EVT14, E.EVT15)
    for state in State:
        for event in Event:
            if (state, event) in TRANSITIONS:
                continue
            if event in received and state in (S.STA1, S.STA4):
                why = "no transport connection is open, so no PDU can arrive"
            elif event in local:
                why = "local request not allowed in this state: refused with InvalidStateError"
            elif event in (E.EVT2, E.EVT5):
                why = "transport connect confirm/indication only happens in Sta4/Sta1"
            elif event == E.EVT17:
                why = "no transport connection is open in Sta1"
            elif event == E.EVT18:
                why = "the ARTIM timer runs only in Sta2 and Sta13"
            else:  # pragma: no cover - the table above is complete
                raise AssertionError(f"no reason for {state!r}, {event!r}")
            reasons[(state, event)] = why
    return reasons


UNREACHABLE: dict[tuple[State, Event], str] = _unreachable()
