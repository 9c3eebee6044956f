"""Find every study of a patient, then move each study to an archive, concurrently.

Everything runs in this process: a small PACS (the same embedded SCP as `dicomnet
serve`) holding a few instances, and an archive that receives the moved studies.
Against a real PACS, keep only `move_patient()` and point it at the PACS's address.

Run: python examples/find_then_move.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.pacs.scp import StorageSCP


async def move_patient(host: str, port: int, patient_id: str, destination: str) -> int:
    """C-FIND the patient's studies, then C-MOVE each study on its own association."""
    query = Dataset()
    query.PatientID = patient_id
    query.StudyInstanceUID = ""
    query.StudyDate = ""
    async with dicomnet.connect(host, port, aet="MOVER", aec="PACS") as assoc:
        studies = [str(ds.StudyInstanceUID) async for ds in assoc.find(query, level="STUDY")]
    print(f"patient {patient_id}: {len(studies)} studies")
    moved = 0

    async def move_study(uid: str) -> None:
        nonlocal moved
        study = Dataset()
        study.StudyInstanceUID = uid
        async with dicomnet.connect(host, port, aet="MOVER", aec="PACS") as assoc:
            async for progress in assoc.move(study, destination=destination, level="STUDY"):
                if progress.is_final:
                    print(
                        f"  study {uid[-12:]}: {progress.completed} moved, {progress.failed} failed"
                    )
                    moved += progress.completed or 0

    async with anyio.create_task_group() as tg:
        for uid in studies:
            tg.start_soon(move_study, uid)
    return moved


async def main() -> int:
    received: list[str] = []
    archive = dicomnet.AE("ARCHIVE")

    @archive.on_store
    async def keep(request: dicomnet.StoreRequest) -> int:
        received.append(request.sop_instance_uid)
        return 0

    with tempfile.TemporaryDirectory() as folder:
        async with archive.serve("127.0.0.1", 0) as archive_server:
            pacs = StorageSCP(
                Path(folder), ae_title="PACS", peers={"ARCHIVE": ("127.0.0.1", archive_server.port)}
            )
            async with pacs.serve("127.0.0.1", 0) as pacs_server:
                # Load the PACS: three studies of one patient, two instances each.
                async with dicomnet.connect("127.0.0.1", pacs_server.port, aec="PACS") as assoc:
                    source = dcmread(get_testdata_file("CT_small.dcm"))
                    for _ in range(3):
                        source.StudyInstanceUID = generate_uid()
                        source.SeriesInstanceUID = generate_uid()
                        for _ in range(2):
                            source.SOPInstanceUID = generate_uid()
                            await assoc.store(source)
                moved = await move_patient(
                    "127.0.0.1", pacs_server.port, str(source.PatientID), "ARCHIVE"
                )
            pacs.close()
    print(f"archive received {len(received)} instances; {moved} reported moved")
    return moved


if __name__ == "__main__":
    anyio.run(main)
