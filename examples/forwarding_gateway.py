"""A gateway that receives instances and forwards each to an archive, concurrently.

Modalities send to the gateway; the gateway answers each C-STORE only after the
archive has accepted the instance, so nothing is acknowledged that was not
forwarded. One long-lived association to the archive is shared by all incoming
associations (a lock keeps one C-STORE in flight on it at a time).

Run: python examples/forwarding_gateway.py
(it starts an archive and the gateway on free ports, sends through it, and stops).
"""

from __future__ import annotations

import anyio
from pydicom.data import get_testdata_file

import dicomnet

FILES = ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm", "rtdose.dcm"]


def make_archive(received: list[str]) -> dicomnet.AE:
    archive = dicomnet.AE("ARCHIVE")

    @archive.on_store
    async def keep(request: dicomnet.StoreRequest) -> int:
        received.append(request.sop_instance_uid)
        return 0x0000

    return archive


def make_gateway(upstream: dicomnet.Association) -> dicomnet.AE:
    gateway = dicomnet.AE("GATEWAY")
    lock = anyio.Lock()

    @gateway.on_store
    async def forward(request: dicomnet.StoreRequest) -> int | tuple[int, str]:
        # Decoded on demand: a router would filter or coerce tags here.
        dataset = request.dataset
        async with lock:
            try:
                return await upstream.store(dataset)
            except dicomnet.DicomNetError as exc:
                return 0xA700, f"forwarding failed: {exc}"[:64]

    return gateway


async def main() -> list[str]:
    received: list[str] = []
    async with make_archive(received).serve("127.0.0.1", 0) as archive:
        async with dicomnet.connect("127.0.0.1", archive.port, aet="GATEWAY", aec="ARCHIVE") as up:
            async with make_gateway(up).serve("127.0.0.1", 0) as gateway:

                async def modality(name: str) -> None:
                    async with dicomnet.connect(
                        "127.0.0.1", gateway.port, aet="CT1", aec="GATEWAY"
                    ) as assoc:
                        status = await assoc.store(get_testdata_file(name))
                        print(f"{name}: {status.description}")

                async with anyio.create_task_group() as tg:
                    for name in FILES:
                        tg.start_soon(modality, name)
    print(f"archive received {len(received)} instances")
    return received


if __name__ == "__main__":
    anyio.run(main)
