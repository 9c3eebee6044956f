"""Modality Worklist interoperability: DCMTK ``findscu -W`` and ``dicomnet find --model mwl``
against ``python -m dicomnet serve --worklist DIR`` holding the items of ``worklist_data``.

Each query states the exact items it must return (Accession Number -> the Scheduled
Procedure Step IDs in the response's sequence), read from the responses findscu writes
with ``-X``; every response also carries the return keys asked, empty where the item has
no value (Patient's Birth Date on most items, Scheduled Procedure Step Location on all),
and its sequence items hold only the keys asked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
import worklist_data
from peers import HOST, DicomnetServer
from pydicom import dcmread
from pydicom.dataset import Dataset

pytestmark = [pytest.mark.dcmtk, pytest.mark.timeout(120)]

SERVER_AET = "WORKLIST"
SPS = "ScheduledProcedureStepSequence[0]"
# Return keys asked in every query, besides its matching keys.
RETURN_KEYS = (
    "AccessionNumber",
    "PatientName",
    "PatientBirthDate",
    f"{SPS}.ScheduledProcedureStepID",
    f"{SPS}.ScheduledProcedureStepLocation",
)
BIRTH_DATES = {"ACC1": "19700101", "ACC4": "19851231"}
NAMES = {item.accession: item.patient for item in worklist_data.ITEMS}

# (matching keys, {accession: [SPS IDs]}) for findscu -W.
CASES: dict[str, tuple[tuple[str, ...], dict[str, list[str]]]] = {
    "modality": (
        (f"{SPS}.Modality=MR",),
        {"ACC1": ["S1"], "ACC3": ["S3"], "ACC6": ["S6"], "ACC7": ["S7b"]},
    ),
    "start-date-range-by-tag": (
        ("(0040,0100)[0].ScheduledProcedureStepStartDate=20261201-20261203",),
        {"ACC1": ["S1"], "ACC2": ["S2"], "ACC3": ["S3"], "ACC4": ["S4"], "ACC7": ["S7a"]},
    ),
    "station-ae-title": (
        (f"{SPS}.ScheduledStationAETitle=CT1",),
        {"ACC2": ["S2"], "ACC5": ["S5"]},
    ),
    "station-and-modality": (
        (f"{SPS}.ScheduledStationAETitle=MR2", f"{SPS}.Modality=MR"),
        {"ACC3": ["S3"], "ACC7": ["S7b"]},
    ),
    "patient-name-wildcard": (
        ("PatientName=Doe*",),
        {"ACC1": ["S1"], "ACC2": ["S2"]},
    ),
    "patient-name-wildcard-lower-case": (
        ("PatientName=d*^ja?e",),
        {"ACC2": ["S2"]},
    ),
    "performing-physician-wildcard": (
        (f"{SPS}.ScheduledPerformingPhysicianName=Smith*",),
        {"ACC1": ["S1"], "ACC3": ["S3"], "ACC5": ["S5"]},
    ),
    "date-time-across-midnight": (
        (
            f"{SPS}.ScheduledProcedureStepStartDate=20261201-20261202",
            f"{SPS}.ScheduledProcedureStepStartTime=2200-0200",
        ),
        {"ACC2": ["S2"], "ACC3": ["S3"]},
    ),
    "no-match": (
        (f"{SPS}.Modality=NM",),
        {},
    ),
}


@pytest.fixture(scope="module")
def findscu() -> str:
    path = peers.dcmtk_tool("findscu")
    if path is None:
        pytest.skip("DCMTK findscu not installed")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DicomnetServer]:
    """One `dicomnet serve --worklist` for the module, stopped at the end."""
    workdir = tmp_path_factory.mktemp("worklist-serve")
    worklist_data.write_worklist(workdir / "worklist")
    started = peers.start_dicomnet_server(
        workdir, aet=SERVER_AET, extra_args=["--worklist", str(workdir / "worklist")]
    )
    try:
        yield started
    finally:
        started.stop()


def with_return_keys(keys: tuple[str, ...]) -> list[str]:
    """`keys` and the return keys that are not among them (a later ``-k`` of the same
    attribute would replace the value of an earlier one)."""
    named = {key.partition("=")[0] for key in keys}
    return [*keys, *(key for key in RETURN_KEYS if key not in named)]


def run_findscu(
    findscu: str, server: DicomnetServer, keys: tuple[str, ...], out: Path
) -> tuple[str, list[Dataset]]:
    """findscu -W with every response written to `out` (-X); its output and the responses."""
    out.mkdir()
    args = [arg for key in with_return_keys(keys) for arg in ("-k", key)]
    result = peers.run_tool(
        [findscu, "-W", "-aet", "FINDSCU", "-aec", SERVER_AET, "-to", "10", "-ta", "10",
         "-td", "30", "-X", "-od", str(out), *args, HOST, str(server.port)],
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, f"{result}\n--- server ---\n{server.log_text(6000)}"
    return str(result), [dcmread(path) for path in sorted(out.glob("rsp*.dcm"))]


def steps_by_accession(responses: list[Dataset]) -> dict[str, list[str]]:
    return {
        str(r.AccessionNumber): [str(s.ScheduledProcedureStepID) for s in r.get(0x00400100, [])]
        for r in responses
    }


def check_return_keys(response: Dataset) -> None:
    """The return keys asked, empty where the item has no value (Type 2); in the
    sequence, only the keys asked."""
    accession = str(response.AccessionNumber)
    assert "PatientBirthDate" in response, accession
    assert (response.PatientBirthDate or "") == BIRTH_DATES.get(accession, ""), accession
    assert str(response.PatientName) == NAMES[accession]  # Müller^Hans in UTF-8
    for step in response.ScheduledProcedureStepSequence:
        assert "ScheduledProcedureStepLocation" in step, accession
        assert not step.ScheduledProcedureStepLocation, accession
        assert set(step.dir()) <= {
            "ScheduledProcedureStepID",
            "ScheduledProcedureStepLocation",
            "Modality",
            "ScheduledStationAETitle",
            "ScheduledProcedureStepStartDate",
            "ScheduledProcedureStepStartTime",
            "ScheduledPerformingPhysicianName",
        }, accession


@pytest.mark.parametrize("case", sorted(CASES))
def test_findscu_worklist_query(
    case: str, findscu: str, server: DicomnetServer, tmp_path: Path
) -> None:
    keys, expected = CASES[case]
    output, responses = run_findscu(findscu, server, keys, tmp_path / "responses")
    assert steps_by_accession(responses) == expected, output
    assert len(responses) == len(expected), output
    for response in responses:
        check_return_keys(response)


def test_findscu_sequence_key_without_item_keys_returns_whole_steps(
    findscu: str, server: DicomnetServer, tmp_path: Path
) -> None:
    """A zero-length sequence key (PS3.4 §K.2.2.1.2 note 4): the whole sequence."""
    out = tmp_path / "responses"
    out.mkdir()
    result = peers.run_tool(
        [findscu, "-W", "-aec", SERVER_AET, "-X", "-od", str(out), "-k", "AccessionNumber=ACC7",
         "-k", "ScheduledProcedureStepSequence", HOST, str(server.port)],
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, str(result)
    (response,) = [dcmread(path) for path in out.glob("rsp*.dcm")]
    steps = response.ScheduledProcedureStepSequence
    assert [s.ScheduledStationAETitle for s in steps] == ["CT2", "MR2"]
    assert steps[0].ScheduledPerformingPhysicianName == "Brown^Dan"


def test_dicomnet_find_worklist(server: DicomnetServer) -> None:
    result = peers.run_dicomnet(
        ["find", HOST, server.port, "--aec", SERVER_AET, "--model", "mwl", "--json",
         "-k", f"{SPS}.Modality=CT", "-k", f"{SPS}.ScheduledProcedureStepStartDate=20261202-",
         *[arg for key in RETURN_KEYS for arg in ("-k", key)]],
        timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, peers.describe_cli(result)
    responses = [Dataset.from_json(json.loads(line)) for line in result.stdout.splitlines()]
    assert steps_by_accession(responses) == {"ACC5": ["S5"], "ACC7": ["S7a"]}, peers.describe_cli(
        result
    )
    for response in responses:
        check_return_keys(response)
    assert "2 match(es)" in result.stderr
