"""Serve storage in-process, then echo it and send it a few files.

Run: python examples/echo_and_store.py [OUTPUT_FOLDER]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import anyio
from pydicom.data import get_testdata_file

import dicomnet

FILES = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]


async def main(folder: Path) -> None:
    ae = dicomnet.AE("ARCHIVE")

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        # Given a folder, save() names the file after the SOP Instance UID, never a path
        # outside the folder whatever the peer sent.
        path = await request.save(folder)
        print(f"received {request.dataset.Modality} {path.name} from {request.calling_ae_title}")
        return 0x0000

    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect(
            "127.0.0.1", server.port, aet="MODALITY", aec="ARCHIVE"
        ) as assoc:
            print("C-ECHO:", (await assoc.echo()).description)
            for name in FILES:
                status = await assoc.store(get_testdata_file(name))
                print(f"C-STORE {name}: {status.description}")


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="dicomnet-"))
    anyio.run(main, out)
    print(f"{len(list(out.glob('*.dcm')))} files in {out}")
