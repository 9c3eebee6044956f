"""`dicomnet delete`: patients, studies and series removed from serve's storage folder and
index together, while serve runs on it; a deleted instance can be stored again."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from peers import HOST, DicomnetServer, describe_cli, run_dicomnet
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomnet.pacs import delete as delete_module
from dicomnet.pacs.delete import Selection, delete
from dicomnet.pacs.index import INDEX_FILE_NAME, Index

pytestmark = pytest.mark.timeout(120)

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PREFIX = "1.2.826.0.1.3680043.10.1138."  # fixed UIDs: readable failures


def write_instance(path: Path, patient: str, study: str, series: str, number: int) -> str:
    """A small Secondary Capture instance; returns its SOP Instance UID."""
    uid = f"{series}.{number}"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = uid
    ds.PatientID = patient
    ds.PatientName = f"{patient}^TEST"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = "OT"
    ds.InstanceNumber = number
    ds.save_as(path, enforce_file_format=True)
    return uid


# patient -> study -> series -> instances
LAYOUT = {
    "PAT-A": {"1": {"1.1": 2, "1.2": 1}, "2": {"2.1": 1}},
    "PAT-B": {"3": {"3.1": 1}},
}


def make_instances(folder: Path) -> dict[str, Path]:
    """The instances of LAYOUT under `folder`, a subfolder per study: SOP Instance UID ->
    file."""
    files: dict[str, Path] = {}
    for patient, studies in LAYOUT.items():
        for study, series_counts in studies.items():
            study_dir = folder / study
            study_dir.mkdir(parents=True, exist_ok=True)
            for series, count in series_counts.items():
                for number in range(1, count + 1):
                    path = study_dir / f"{series}.{number}.dcm"
                    uid = write_instance(path, patient, PREFIX + study, PREFIX + series, number)
                    files[uid] = path
    return files


def studies_found(server: DicomnetServer) -> set[str]:
    """The Study Instance UIDs a C-FIND finds (which also waits for indexing)."""
    result = run_dicomnet(["find", HOST, server.port, "-k", "StudyInstanceUID", "-k", "PatientID"])
    assert result.returncode == 0, describe_cli(result)
    return set(re.findall(r"StudyInstanceUID=(\S+)", result.stdout))


def dicomnet_delete(server: DicomnetServer, *args: str) -> object:
    return run_dicomnet(["delete", "--storage", server.storage, *args])


def test_delete_while_serve_runs_and_store_again(
    tmp_path: Path, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    # --on-duplicate reject: were a deleted instance remembered, storing it again would fail.
    server = dicomnet_server(extra_args=["--on-duplicate", "reject"])
    files = make_instances(tmp_path / "in")
    stored = run_dicomnet(["store", HOST, server.port, tmp_path / "in"])
    assert stored.returncode == 0, describe_cli(stored)
    assert studies_found(server) == {PREFIX + s for s in ("1", "2", "3")}
    assert set(server.wait_stored(files)) == set(files)

    # One series of a study of two series.
    result = dicomnet_delete(server, "--series-uid", PREFIX + "1.2")
    assert result.returncode == 0, describe_cli(result)
    assert result.stdout.startswith("removed 0 patients, 0 studies, 1 series, 1 instance ("), (
        describe_cli(result)
    )
    assert PREFIX + "1.2.1" not in server.stored()

    # A dry run lists and removes nothing.
    result = dicomnet_delete(server, "--study-uid", PREFIX + "1", "--dry-run")
    assert result.returncode == 0, describe_cli(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("would remove 0 patients, 1 study, 1 series, 2 instances ("), lines
    assert lines[1:] == [
        f"  patient PAT-A  study {PREFIX}1  series {PREFIX}1.1: 2 instances",
    ]
    assert {PREFIX + "1.1.1", PREFIX + "1.1.2"} <= set(server.stored())
    assert PREFIX + "1" in studies_found(server)

    # The study: its files, and the C-FIND, C-GET of a running serve no longer find it.
    result = dicomnet_delete(server, "--study-uid", PREFIX + "1")
    assert result.returncode == 0, describe_cli(result)
    assert result.stdout.startswith("removed 0 patients, 1 study, 1 series, 2 instances (")
    assert not {PREFIX + "1.1.1", PREFIX + "1.1.2"} & set(server.stored())
    assert studies_found(server) == {PREFIX + "2", PREFIX + "3"}
    got = run_dicomnet(
        ["get", HOST, server.port, "--out", tmp_path / "got", "-k", f"StudyInstanceUID={PREFIX}1"]
    )
    assert got.returncode == 0, describe_cli(got)
    assert "received 0 instance(s)" in got.stderr
    assert not list((tmp_path / "got").iterdir())
    assert not [p for p in (server.storage / ".tmp").iterdir() if p.name.startswith("deleting-")]

    # Stored again: accepted (not a duplicate), indexed, found.
    again = run_dicomnet(["store", HOST, server.port, tmp_path / "in" / "1"])
    assert again.returncode == 0, describe_cli(again)
    assert again.stdout.startswith("sent 3, warning 0, failed 0"), describe_cli(again)
    assert studies_found(server) == {PREFIX + s for s in ("1", "2", "3")}
    assert {PREFIX + "1.1.1", PREFIX + "1.1.2", PREFIX + "1.2.1"} <= set(server.stored())

    # A whole patient, then nothing left to match.
    result = dicomnet_delete(server, "--patient-id", "PAT-A", "-v")
    assert result.returncode == 0, describe_cli(result)
    assert "removed 1 patient, 2 studies, 3 series, 4 instances (" in result.stdout
    assert result.stdout.count("removed ") == 5  # a line per file with -v, and the counts
    assert studies_found(server) == {PREFIX + "3"}
    assert set(server.stored()) == {PREFIX + "3.1.1"}

    result = dicomnet_delete(server, "--patient-id", "PAT-A")
    assert result.returncode == 1, describe_cli(result)
    assert result.stdout == ""
    assert result.stderr.strip() == (
        f"dicomnet delete: nothing matched PatientID PAT-A in {server.storage}"
    )
    assert server.alive()


def test_delete_bench_instances(dicomnet_server: Callable[..., DicomnetServer]) -> None:
    server = dicomnet_server()
    bench = run_dicomnet(["bench", HOST, server.port, "--op", "store", "--count", "5"])
    assert bench.returncode == 0, describe_cli(bench)
    command = re.search(r"dicomnet delete --storage DIR --study-uid (\S+)", bench.stdout)
    assert command is not None, describe_cli(bench)
    study = command.group(1)
    assert study in studies_found(server)
    other = run_dicomnet(["bench", HOST, server.port, "--op", "store", "--count", "2"])
    assert other.returncode == 0, describe_cli(other)
    assert len(studies_found(server)) == 2

    result = dicomnet_delete(server, "--study-uid", study)
    assert result.stdout.startswith("removed 0 patients, 1 study, 1 series, 5 instances (")
    result = dicomnet_delete(server, "--bench")
    assert result.returncode == 0, describe_cli(result)
    assert result.stdout.startswith("removed 1 patient, 1 study, 1 series, 2 instances (")
    assert studies_found(server) == set()
    assert server.stored() == {}


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        ([], "say what to delete: --patient-id, --study-uid, --series-uid or --bench"),
        (["--bench", "--patient-id", "SOMEONE"], "--bench is --patient-id DICOMNET-BENCH"),
        (
            ["--study-uid", " "],
            "an empty --patient-id, --study-uid or --series-uid selects nothing",
        ),
    ],
)
def test_delete_usage_errors(tmp_path: Path, argv: list[str], words: str) -> None:
    result = run_dicomnet(["delete", "--storage", tmp_path, *argv])
    assert result.returncode == 2, describe_cli(result)
    assert result.stderr.strip().splitlines() == [f"dicomnet delete: {words}"], describe_cli(result)


def test_delete_needs_a_storage_folder(tmp_path: Path) -> None:
    result = run_dicomnet(["delete", "--storage", tmp_path, "--bench"])
    assert result.returncode == 2, describe_cli(result)
    assert result.stderr.strip() == (
        f"dicomnet delete: {tmp_path} has no index ({INDEX_FILE_NAME}): not a storage folder "
        "of dicomnet serve"
    )
    assert not (tmp_path / INDEX_FILE_NAME).exists()  # not made by looking
    missing = run_dicomnet(["delete", "--storage", tmp_path / "nope", "--bench"])
    assert missing.returncode == 2, describe_cli(missing)
    assert missing.stderr.strip() == f"dicomnet delete: {tmp_path / 'nope'} is not a folder"


def test_a_file_that_cannot_go_removes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage = tmp_path / "storage"
    files = make_instances(storage)
    with Index(storage / INDEX_FILE_NAME, root=storage) as index:
        assert index.add_many(files.values()) == 5
        before = index.counts()
        renames = 0
        real_rename = os.rename

        def failing_rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
            nonlocal renames
            renames += 1
            if renames == 2:
                raise PermissionError(13, "Permission denied", str(src))
            real_rename(src, dst)

        monkeypatch.setattr(delete_module.os, "rename", failing_rename)
        with pytest.raises(PermissionError):
            delete(index, Selection(patient_id="PAT-A"))
        monkeypatch.undo()
        assert index.counts() == before
        assert all(path.is_file() for path in files.values())
        assert not list((storage / ".tmp").iterdir())

        # Then it goes, and an instance whose file was already gone counts as removed.
        files[PREFIX + "2.1.1"].unlink()
        result = delete(index, Selection(patient_id="PAT-A"))
        assert (result.patients, result.studies, result.series, result.instances) == (1, 2, 3, 4)
        assert result.missing == [files[PREFIX + "2.1.1"]]
        assert sorted(result.files) == sorted(
            files[PREFIX + uid] for uid in ("1.1.1", "1.1.2", "1.2.1")
        )
        assert index.counts() == (1, 1, 1, 1)
        assert list(storage.rglob("*.dcm")) == [files[PREFIX + "3.1.1"]]


def test_a_dry_run_changes_nothing(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    files = make_instances(storage)
    with Index(storage / INDEX_FILE_NAME, root=storage) as index:
        index.add_many(files.values())
        result = delete(index, Selection(study_instance_uid=PREFIX + "1"), dry_run=True)
        assert (result.patients, result.studies, result.series, result.instances) == (0, 1, 2, 3)
        assert len(result.files) == 3 and all(p.is_file() for p in result.files)
        assert index.counts() == (2, 3, 4, 5)
        with pytest.raises(ValueError):
            Selection()
