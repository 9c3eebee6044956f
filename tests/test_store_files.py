"""What `dicomnet store` sends from a folder: data sets written without file meta are
read (their transfer syntax told by their first element) and sent, as DCMTK's storescu
sends them; a DICOMDIR is skipped with a note, not counted as a failure."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from peers import HOST, DicomnetServer, describe_cli, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file

WITHOUT_META = {
    "rtstruct.dcm": "1.2.840.10008.1.2",  # implicit VR little endian
    "ExplVR_LitEndNoMeta.dcm": "1.2.840.10008.1.2.1",
    "ExplVR_BigEndNoMeta.dcm": "1.2.840.10008.1.2.2",
}


def test_files_without_meta_are_sent_and_a_dicomdir_is_skipped(
    dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    uids = {}
    for name in WITHOUT_META:
        source = get_testdata_file(name)
        assert source is not None
        shutil.copy(source, folder / name)
        uids[name] = str(dcmread(source, force=True).SOPInstanceUID)
    dicomdir = get_testdata_file("DICOMDIR")
    assert dicomdir is not None
    shutil.copy(dicomdir, folder / "DICOMDIR")
    (folder / "notes.txt").write_text("not DICOM\n")
    server = dicomnet_server()
    result = run_dicomnet(["store", HOST, server.port, folder])
    assert result.returncode == 0, describe_cli(result)
    summary = result.stdout
    assert "sent 3, warning 0, failed 0, skipped 1 non-DICOM, skipped 1 DICOMDIR" in summary
    # The two explicit VR files are one instance (same SOP Instance UID) in two byte
    # orders: the first received is kept (`--on-duplicate keep`), either is whole.
    stored = server.wait_stored(uids.values())
    for name, uid in uids.items():
        assert uid in stored, f"{name} not stored"
        kept = dcmread(stored[uid])
        assert kept.SOPInstanceUID == uid
        assert kept.file_meta.TransferSyntaxUID in WITHOUT_META.values()
    assert dcmread(stored[uids["rtstruct.dcm"]]).StructureSetLabel


def test_pydicom_remarks_stay_out_of_the_output(
    dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    """A file pydicom reads with a remark (implicit VR under an explicit syntax): the
    command says what became of it, without pydicom's log line and warning (--debug
    shows them)."""
    odd = get_testdata_file("SC_rgb_jpeg.dcm")
    assert odd is not None
    server = dicomnet_server()
    result = run_dicomnet(["store", HOST, server.port, odd])
    remarks = ("WARNING pydicom", "UserWarning", "Expected explicit VR")
    assert not any(remark in result.stderr for remark in remarks), describe_cli(result)
    assert "failed 1" in result.stdout or "sent 1" in result.stdout, describe_cli(result)
