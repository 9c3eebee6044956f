"""The embedded SCP behind `dicomnet serve`: verification and storage to a folder."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from dicomnet.server import AE
from dicomnet.service import StoreRequest
from dicomnet.storage import is_valid_uid

__all__ = ["StorageSCP"]

log = logging.getLogger("dicomnet")

SPOOL_FOLDER = ".tmp"


class StorageSCP:
    """Stores every received instance as `<storage>/<SOPInstanceUID>.dcm`, bit-preserving.

    Data sets are spooled in `<storage>/.tmp` (same file system, so the final rename is
    atomic); leftovers of an earlier crash there are removed at start.
    """

    def __init__(
        self,
        storage: Path,
        *,
        ae_title: str = "DICOMNET",
        peers: dict[str, tuple[str, int]] | None = None,
        allowed_calling_ae_titles: Iterable[str] | None = None,
        max_associations: int | None = None,
        fsync: bool = True,
        idle_timeout: float | None = 600.0,
    ) -> None:
        self.storage = storage
        storage.mkdir(parents=True, exist_ok=True)
        spool = storage / SPOOL_FOLDER
        spool.mkdir(exist_ok=True)
        for leftover in spool.glob("*.part"):
            leftover.unlink(missing_ok=True)
        for leftover in storage.glob(".*.part"):
            leftover.unlink(missing_ok=True)
        self.ae = AE(
            ae_title,
            max_associations=max_associations,
            allowed_calling_ae_titles=allowed_calling_ae_titles,
            spool_dir=spool,
            fsync=fsync,
            idle_timeout=idle_timeout,
            peers=peers,
        )
        self.ae.on_store(self.store)

    def path_for(self, sop_instance_uid: str) -> Path:
        return self.storage / f"{sop_instance_uid}.dcm"

    async def store(self, request: StoreRequest) -> int | tuple[int, str]:
        uid = request.sop_instance_uid
        if not is_valid_uid(uid):  # also checked before the data set is spooled
            return 0xC000, "invalid SOP Instance UID"
        path = self.path_for(uid)
        await request.save(path)
        log.info("stored %s from %r (%d bytes)", path.name, request.calling_ae_title, request.size)
        return 0x0000
