"""Modality Worklist matching (PS3.4 Annex K) on data sets: every kind of matching,
Sequence Matching in the Scheduled Procedure Step Sequence, combined date-time ranges,
empty return keys and character sets."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import worklist_data
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnet.pacs.index import QueryError
from dicomnet.pacs.worklist_matching import WorklistQuery, match_item
from dicomnet.storage import decode_dataset, encode_dataset

pytestmark = [
    pytest.mark.timeout(30),
    # Ranges and wild cards in DA/TM keys are not valid DA/TM values: pydicom says so.
    pytest.mark.filterwarnings("ignore:Invalid value for VR"),
]

ITEMS = worklist_data.datasets()


def query(sps: dict[str, str] | None = None, **keys: str) -> Dataset:
    """An identifier with `keys` at the top level and `sps` in the single item of the
    Scheduled Procedure Step Sequence (no sequence when None)."""
    ds = Dataset()
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    if sps is not None:
        item = Dataset()
        for keyword, value in sps.items():
            setattr(item, keyword, value)
        ds.ScheduledProcedureStepSequence = [item]
    return ds


def found(identifier: Dataset, items: Iterable[Dataset] = ITEMS) -> dict[str, Dataset]:
    """Accession Number -> response, for every item that matches."""
    parsed = WorklistQuery.parse(identifier)
    out = {}
    for item in items:
        response = parsed.match(item)
        if response is not None:
            out[item.AccessionNumber] = response
    return out


def accessions(identifier: Dataset) -> set[str]:
    return set(found(identifier))


def step_ids(response: Dataset) -> list[str]:
    return [step.ScheduledProcedureStepID for step in response.ScheduledProcedureStepSequence]


# -- the kinds of matching (§K.2.2.2, §C.2.2.2) -------------------------------------------


def test_single_value_matching_is_exact() -> None:
    assert accessions(query(AccessionNumber="ACC3")) == {"ACC3"}
    assert accessions(query(AccessionNumber="acc3")) == set()  # SH: case-sensitive
    assert accessions(query(PatientID="P5")) == {"ACC5"}


def test_universal_matching_matches_all_and_returns_the_values() -> None:
    responses = found(query(AccessionNumber="", PatientName=""))
    assert set(responses) == {f"ACC{i}" for i in range(1, 8)}
    assert responses["ACC4"].PatientName == "Roe^Richard"


def test_a_missing_value_fails_a_matching_key_but_not_a_lone_star() -> None:
    """§K.2.2.1.1.1: an unknown value matches no key value; `*` is universal (note 1)."""
    assert accessions(query(PatientBirthDate="19000101-20991231")) == {"ACC1", "ACC4"}
    assert len(accessions(query(PatientBirthDate="*"))) == 7


def test_wildcard_matching_on_names_is_case_insensitive() -> None:
    assert accessions(query(PatientName="Doe*")) == {"ACC1", "ACC2"}
    assert accessions(query(PatientName="d?e^*")) == {"ACC1", "ACC2"}
    assert accessions(query(PatientName="*o?^*")) == {"ACC1", "ACC2", "ACC4", "ACC7"}
    assert accessions(query(PatientName="MÜLLER*")) == {"ACC3"}


def test_wildcard_matching_on_other_text_vrs() -> None:
    assert accessions(query(AccessionNumber="ACC?")) == {f"ACC{i}" for i in range(1, 8)}
    assert accessions(query(RequestedProcedureID="RP[12]")) == set()  # no character classes
    assert accessions(query({"ScheduledStationAETitle": "CT*"})) == {"ACC2", "ACC5", "ACC7"}


def test_list_of_uid_matching() -> None:
    uids = "\\".join(f"1.2.826.0.1.3680043.10.1452.99.{n}" for n in (2, 6, 9))
    assert accessions(query(StudyInstanceUID=uids)) == {"ACC2", "ACC6"}


def test_range_matching_on_a_date_and_on_a_time() -> None:
    assert accessions(query(PatientBirthDate="-19801231")) == {"ACC1"}
    assert accessions(query(PatientBirthDate="1985-")) == {"ACC4"}
    morning = query({"ScheduledProcedureStepStartTime": "0800-1000"})
    assert accessions(morning) == {"ACC1", "ACC5", "ACC6", "ACC7"}


def test_an_unparseable_range_is_unable_to_process() -> None:
    with pytest.raises(QueryError) as caught:
        WorklistQuery.parse(query({"ScheduledProcedureStepStartDate": "2026-12-01"}))
    assert caught.value.status == 0xC000


# -- Sequence Matching (§C.2.2.2.6) -------------------------------------------------------


def test_sequence_matching_on_modality_returns_only_the_matching_steps() -> None:
    responses = found(query({"Modality": "MR", "ScheduledProcedureStepID": ""}))
    assert set(responses) == {"ACC1", "ACC3", "ACC6", "ACC7"}
    assert step_ids(responses["ACC7"]) == ["S7b"]  # the CT step is left out
    step = responses["ACC1"].ScheduledProcedureStepSequence[0]
    assert set(step.dir()) == {"Modality", "ScheduledProcedureStepID"}  # only the keys asked


def test_sequence_matching_needs_every_item_key_in_the_same_step() -> None:
    # ACC7 has a CT step and an MR2 step, but no CT step on MR2.
    assert accessions(query({"Modality": "CT", "ScheduledStationAETitle": "MR2"})) == set()
    assert accessions(query({"Modality": "MR", "ScheduledStationAETitle": "MR2"})) == {
        "ACC3",
        "ACC7",
    }


def test_sequence_matching_on_station_date_range_and_physician() -> None:
    assert accessions(query({"ScheduledStationAETitle": "CT1"})) == {"ACC2", "ACC5"}
    dates = query({"ScheduledProcedureStepStartDate": "20261201-20261203"})
    assert accessions(dates) == {"ACC1", "ACC2", "ACC3", "ACC4", "ACC7"}
    responses = found(query({"ScheduledPerformingPhysicianName": "smith*"}))
    assert set(responses) == {"ACC1", "ACC3", "ACC5"}
    # ACC7's MR step has no physician: a wild card other than "*" does not match it.
    assert accessions(query({"ScheduledPerformingPhysicianName": "?*"})) == {
        f"ACC{i}" for i in range(1, 8)
    }
    named = query({"ScheduledPerformingPhysicianName": "?*", "ScheduledProcedureStepID": ""})
    assert step_ids(found(named)["ACC7"]) == ["S7a"]


def test_a_sequence_key_without_item_keys_returns_the_whole_sequence() -> None:
    for sequence in ([], [Dataset()]):
        identifier = query(AccessionNumber="ACC7")
        identifier.ScheduledProcedureStepSequence = sequence
        (response,) = found(identifier).values()
        assert step_ids(response) == ["S7a", "S7b"]
        assert response.ScheduledProcedureStepSequence[1].ScheduledProcedureStepDescription


def test_return_keys_in_a_sequence_come_back_empty_when_the_step_lacks_them() -> None:
    responses = found(query({"ScheduledProcedureStepLocation": "", "Modality": "US"}))
    (step,) = responses["ACC4"].ScheduledProcedureStepSequence
    assert "ScheduledProcedureStepLocation" in step
    assert step.ScheduledProcedureStepLocation in (None, "")


def test_a_universal_key_item_matches_an_item_without_the_sequence() -> None:
    bare = Dataset()
    bare.AccessionNumber = "BARE"
    (response,) = found(query({"Modality": ""}, AccessionNumber=""), [bare]).values()
    assert response.ScheduledProcedureStepSequence == []
    assert found(query({"Modality": "MR"}), [bare]) == {}


# -- combined date and time (§C.2.2.2.5) ------------------------------------------------


def test_combined_date_time_range_across_midnight() -> None:
    """20261201 22:00 to 20261202 02:00: ACC2 (1201 23:00) and ACC3 (1202 01:30); not
    ACC1 (1201 08:00) nor ACC7 (1202 10:00), which match the dates and times apart."""
    night = {
        "ScheduledProcedureStepStartDate": "20261201-20261202",
        "ScheduledProcedureStepStartTime": "2200-0200",
    }
    assert accessions(query(night)) == {"ACC2", "ACC3"}


def test_combined_date_time_with_open_ends_and_single_values() -> None:
    def steps(date: str, time: str) -> set[str]:
        keys = {"ScheduledProcedureStepStartDate": date, "ScheduledProcedureStepStartTime": time}
        return accessions(query(keys))

    assert steps("20261202-", "1000-") == {"ACC4", "ACC5", "ACC7"}  # from 1202 10:00
    assert steps("-20261201", "-0800") == {"ACC1", "ACC6"}  # until 1201 08:00:59
    assert steps("20261201", "2200-2359") == {"ACC2"}  # one day, a time range
    assert steps("20261202-20261205", "1400") == {"ACC4", "ACC5", "ACC7"}  # to 1205 14:00
    assert steps("20261202", "1000") == {"ACC7"}  # two single values
    assert steps("20261201", "2200-0200") == set()  # one day: crossing midnight is empty


def test_a_time_range_alone_does_not_cross_midnight() -> None:
    assert accessions(query({"ScheduledProcedureStepStartTime": "2200-0200"})) == set()


# -- responses (§K.2.2.1.2) -------------------------------------------------------------


def test_response_holds_every_key_asked_and_only_those() -> None:
    identifier = query({"Modality": "CT"}, AccessionNumber="", PatientName="", PatientBirthDate="")
    identifier.PatientWeight = None
    identifier.QueryRetrieveLevel = "PATIENT"  # not part of a worklist query: ignored
    response = found(identifier)["ACC5"]
    assert set(response.dir()) == {
        "AccessionNumber",
        "PatientName",
        "PatientBirthDate",
        "PatientWeight",
        "ScheduledProcedureStepSequence",
    }
    assert response.PatientBirthDate in (None, "")  # Type 2: present, empty
    assert response.PatientWeight is None
    assert response.ScheduledProcedureStepSequence[0].Modality == "CT"


def test_specific_character_set_of_the_response() -> None:
    # Latin-1 text asked without a character set: UTF-8.
    response = match_item(query(PatientName=""), ITEMS[2])
    assert response is not None and response.SpecificCharacterSet == "ISO_IR 192"
    # Asked in Latin-1, which encodes it: Latin-1.
    response = match_item(query(PatientName="", SpecificCharacterSet="ISO_IR 100"), ITEMS[2])
    assert response is not None and response.SpecificCharacterSet == "ISO_IR 100"
    # Greek cannot be Latin-1: UTF-8.
    greek = Dataset()
    greek.PatientName = "Διονυσιος"
    response = match_item(query(PatientName="", SpecificCharacterSet="ISO_IR 100"), greek)
    assert response is not None and response.SpecificCharacterSet == "ISO_IR 192"
    # ASCII only: the character set asked is echoed, none when none was asked.
    response = match_item(query(PatientName="", SpecificCharacterSet="ISO_IR 100"), ITEMS[0])
    assert response is not None and response.SpecificCharacterSet == "ISO_IR 100"
    response = match_item(query(PatientName=""), ITEMS[0])
    assert response is not None and "SpecificCharacterSet" not in response


@pytest.mark.parametrize("whole_sequence", [False, True])
def test_responses_encode_and_decode_back_under_each_character_set(whole_sequence: bool) -> None:
    """The same item answered in UTF-8, Latin-1, then UTF-8 again: the names decode back
    each time (a person name's bytes of an earlier response are not sent again)."""
    item = ITEMS[2].copy()
    step = item.ScheduledProcedureStepSequence[0]
    step.ScheduledPerformingPhysicianName = "Ångström^Åsa"
    for charset in (None, "ISO_IR 100", "ISO_IR 192", None):
        identifier = query(None if whole_sequence else {"ScheduledPerformingPhysicianName": ""})
        identifier.PatientName = ""
        if whole_sequence:
            identifier.ScheduledProcedureStepSequence = []
        if charset is not None:
            identifier.SpecificCharacterSet = charset
        response = match_item(identifier, item)
        assert response is not None
        data = encode_dataset(response, ExplicitVRLittleEndian)
        back = decode_dataset(data, ExplicitVRLittleEndian)
        assert back.SpecificCharacterSet == (charset or "ISO_IR 192")
        assert str(back.PatientName) == "Müller^Hans"
        name = back.ScheduledProcedureStepSequence[0].ScheduledPerformingPhysicianName
        assert str(name) == "Ångström^Åsa"
