"""`dicomnet.proto.fsm` against PS3.8 §9.2, transcribed here independently of the module.

Sources: PS3.8 §9.2.1 (states, Tables 9-1 .. 9-5), §9.2.2 (actions, Tables 9-6 .. 9-9;
read from dicom.nema.org/medical/dicom/2019a/output/chtml/part08/sect_9.2.2.html)
and §9.2.3 Table 9-10 (the state transition table). Table 9-10 below is laid out as the
standard prints it: one row per event, one column per state. It was
cross-checked against two independent published transcriptions of Table 9-10 (pynetdicom's
`fsm.TRANSITION_TABLE` and a Python test-suite table found in a public repository); all three
agree, including Evt18 (ARTIM expired) in Sta13 = AA-2, where dicomnet first had AR-5.
"""

from __future__ import annotations

import pytest

from dicomnet.proto.fsm import ACTION_NEXT_STATES, TRANSITIONS, UNREACHABLE, Action, Event, State
from dicomnet.proto.ul import UpperLayer

# "." is a blank cell. Rows: Evt1 A-ASSOCIATE request (local user); Evt2 transport connect
# confirm; Evt3 A-ASSOCIATE-AC PDU; Evt4 A-ASSOCIATE-RJ PDU; Evt5 transport connection
# indication; Evt6 A-ASSOCIATE-RQ PDU; Evt7/Evt8 A-ASSOCIATE response (accept/reject);
# Evt9 P-DATA request; Evt10 P-DATA-TF PDU; Evt11 A-RELEASE request; Evt12 A-RELEASE-RQ PDU;
# Evt13 A-RELEASE-RP PDU; Evt14 A-RELEASE response; Evt15 A-ABORT request; Evt16 A-ABORT
# PDU; Evt17 transport connection closed; Evt18 ARTIM timer expired; Evt19 unrecognized or
# invalid PDU received.
TABLE_9_10_TEXT = """
        Sta1  Sta2  Sta3  Sta4  Sta5  Sta6  Sta7  Sta8  Sta9  Sta10 Sta11 Sta12 Sta13
Evt1    AE-1  .     .     .     .     .     .     .     .     .     .     .     .
Evt2    .     .     .     AE-2  .     .     .     .     .     .     .     .     .
Evt3    .     AA-1  AA-8  .     AE-3  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt4    .     AA-1  AA-8  .     AE-4  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt5    AE-5  .     .     .     .     .     .     .     .     .     .     .     .
Evt6    .     AE-6  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
Evt7    .     .     AE-7  .     .     .     .     .     .     .     .     .     .
Evt8    .     .     AE-8  .     .     .     .     .     .     .     .     .     .
Evt9    .     .     .     .     .     DT-1  .     AR-7  .     .     .     .     .
Evt10   .     AA-1  AA-8  .     AA-8  DT-2  AR-6  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt11   .     .     .     .     .     AR-1  .     .     .     .     .     .     .
Evt12   .     AA-1  AA-8  .     AA-8  AR-2  AR-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-6
Evt13   .     AA-1  AA-8  .     AA-8  AA-8  AR-3  AA-8  AA-8  AR-10 AR-3  AA-8  AA-6
Evt14   .     .     .     .     .     .     .     AR-4  AR-9  .     .     AR-4  .
Evt15   .     .     AA-1  AA-2  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  AA-1  .
Evt16   .     AA-2  AA-3  .     AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-3  AA-2
Evt17   .     AA-5  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AA-4  AR-5
Evt18   .     AA-2  .     .     .     .     .     .     .     .     .     .     AA-2
Evt19   .     AA-1  AA-8  .     AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-8  AA-7
"""


def _parse_table(text: str) -> dict[int, tuple[str, ...]]:
    lines = [line.split() for line in text.strip().splitlines()]
    assert lines[0] == [f"Sta{n}" for n in range(1, 14)]
    table = {}
    for row in lines[1:]:
        assert row[0].startswith("Evt") and len(row) == 14, row
        table[int(row[0][3:])] = tuple("" if cell == "." else cell for cell in row[1:])
    return table


TABLE_9_10 = _parse_table(TABLE_9_10_TEXT)

# PS3.8 Tables 9-6 .. 9-9: "Next state is ..." of each action. AE-6 goes to Sta3 when the
# A-ASSOCIATE-RQ is acceptable to the service-provider, otherwise to Sta13; AR-8 to Sta9
# for the association-requestor, otherwise to Sta10.
# fmt: off
NEXT_STATES: dict[str, tuple[int, ...]] = {
    "AE-1": (4,), "AE-2": (5,), "AE-3": (6,), "AE-4": (1,), "AE-5": (2,), "AE-6": (3, 13),
    "AE-7": (6,), "AE-8": (13,),
    "DT-1": (6,), "DT-2": (6,),
    "AR-1": (7,), "AR-2": (8,), "AR-3": (1,), "AR-4": (13,), "AR-5": (1,), "AR-6": (7,),
    "AR-7": (8,), "AR-8": (9, 10), "AR-9": (11,), "AR-10": (12,),
    "AA-1": (13,), "AA-2": (1,), "AA-3": (1,), "AA-4": (1,), "AA-5": (1,), "AA-6": (13,),
    "AA-7": (13,), "AA-8": (13,),
}
# fmt: on

CELLS = [(state, event) for event in Event for state in State]


def _standard(state: State, event: Event) -> str:
    return TABLE_9_10[event.value][state.value - 1]


def test_the_transcription_is_complete() -> None:
    assert sorted(TABLE_9_10) == list(range(1, 20))
    assert all(len(row) == 13 for row in TABLE_9_10.values())
    assert {cell for row in TABLE_9_10.values() for cell in row} - {""} == set(NEXT_STATES)
    assert len(State) == 13 and len(Event) == 19 and len(Action) == 28


@pytest.mark.parametrize(("state", "event"), CELLS, ids=[f"{s.name}-{e.name}" for s, e in CELLS])
def test_transition_cell_matches_table_9_10(state: State, event: Event) -> None:
    expected = _standard(state, event)
    actual = TRANSITIONS.get((state, event))
    assert (actual.value if actual is not None else "") == expected


def test_transitions_equal_table_9_10() -> None:
    expected = {
        (State(s + 1), Event(e)): Action(cell)
        for e, row in TABLE_9_10.items()
        for s, cell in enumerate(row)
        if cell
    }
    assert expected == TRANSITIONS


def test_every_pair_is_either_a_transition_or_unreachable() -> None:
    for state in State:
        for event in Event:
            in_table = (state, event) in TRANSITIONS
            unreachable = (state, event) in UNREACHABLE
            assert in_table != unreachable, (state, event)
            if unreachable:
                assert UNREACHABLE[(state, event)].strip()
    assert len(TRANSITIONS) + len(UNREACHABLE) == 13 * 19


def test_unreachable_received_pdus_are_only_those_without_a_connection() -> None:
    # With a transport connection open (Sta2, Sta3, Sta5 .. Sta13) the standard defines
    # what happens for every received PDU and for Evt17/Evt19.
    received = (3, 4, 6, 10, 12, 13, 16, 17, 19)
    for state in State:
        for number in received:
            connected = state not in (State.STA1, State.STA4)
            if connected:
                assert (state, Event(number)) in TRANSITIONS, (state, number)


def test_action_next_states_match_tables_9_6_to_9_9() -> None:
    assert {a.value: tuple(int(s) for s in states) for a, states in ACTION_NEXT_STATES.items()} == (
        NEXT_STATES
    )
    assert {a.value for a in Action} == set(NEXT_STATES)


def test_every_action_is_used_and_implemented() -> None:
    assert set(TRANSITIONS.values()) == set(Action)
    for action in Action:
        assert callable(getattr(UpperLayer, "_" + action.name.lower(), None)), action
