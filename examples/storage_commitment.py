"""A modality stores two images, then asks the PACS to commit them before it deletes
its own copies (Storage Commitment Push Model, PS3.4 Annex J).

Everything runs in this process: a small PACS (the same embedded SCP as `dicomnet
serve`), and the modality. The first request gets its report on the same association;
for the second, the modality releases at once and the PACS sends the report on an
association of its own to the modality's listener.

Run: python examples/storage_commitment.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio
from pydicom.data import get_testdata_file

import dicomnet
from dicomnet.pacs.scp import StorageSCP

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
NEVER_SENT = ("1.2.840.10008.5.1.4.1.1.2", "1.2.826.0.1.3680043.8.498.999")


def show(result: dicomnet.CommitmentResult) -> None:
    print(f"transaction {result.transaction_uid[-12:]}:")
    for _, uid in result.committed:
        print(f"  committed {uid}")
    for _, uid, reason in result.failed:
        print(f"  failed {uid} (failure reason 0x{reason:04X})")


async def main(storage: Path) -> None:
    pacs = StorageSCP(storage, ae_title="PACS")
    async with (
        pacs.serve("127.0.0.1", 0) as server,
        dicomnet.commitment_listener("MODALITY", "127.0.0.1", 0) as listener,
    ):
        # The PACS must know where the modality listens (`dicomnet serve --peer`).
        pacs.ae.peers["MODALITY"] = (listener.host, listener.port)
        address = ("127.0.0.1", server.port)
        async with dicomnet.connect(*address, aet="MODALITY", aec="PACS") as assoc:
            for path in (CT, MR):
                await assoc.store(path)
            # The report comes back on this association: one instance was never sent.
            show(await assoc.request_commitment([CT, MR, NEVER_SENT], timeout=30))
        async with dicomnet.connect(*address, aet="MODALITY", aec="PACS") as assoc:
            pending = await assoc.send_commitment_request([CT, MR], listener=listener)
        # Released: the PACS reports on an association it opens to our listener.
        try:
            result = await pending.result(timeout=30)
        finally:
            pending.close()
        show(result)
        if result.all_committed:
            print("all committed: the modality may delete its copies")
    pacs.close()


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        anyio.run(main, Path(folder))
