"""What SCP handlers receive: association requests and DIMSE requests."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicomnet.proto.contexts import AcceptedContext
from dicomnet.proto.dimse import CEchoRQ, CStoreRQ
from dicomnet.proto.pdu import AAssociateRQ, UserIdentityRQ
from dicomnet.storage import Spool

if TYPE_CHECKING:
    from dicomnet.association import Association

__all__ = ["AssociationRequest", "EchoRequest", "StoreRequest"]


@dataclass(frozen=True, slots=True)
class AssociationRequest:
    """An A-ASSOCIATE-RQ awaiting the `on_association` handler's verdict."""

    pdu: AAssociateRQ
    peer_host: str
    peer_port: int

    @property
    def calling_ae_title(self) -> str:
        return self.pdu.calling_ae_title

    @property
    def called_ae_title(self) -> str:
        return self.pdu.called_ae_title

    @property
    def user_identity(self) -> UserIdentityRQ | None:
        return self.pdu.user_information.user_identity_rq

    @property
    def implementation_class_uid(self) -> str | None:
        return self.pdu.user_information.implementation_class_uid

    @property
    def implementation_version_name(self) -> str | None:
        return self.pdu.user_information.implementation_version_name


@dataclass(slots=True)
class EchoRequest:
    """A C-ECHO-RQ (PS3.7 §9.1.5)."""

    association: Association
    context: AcceptedContext
    message: CEchoRQ


@dataclass(slots=True)
class StoreRequest:
    """A C-STORE-RQ with its data set (PS3.7 §9.1.1).

    The data set stays as received (spooled to memory or a temp file); `dataset`
    decodes it on first use, `save()` writes it as a Part-10 file atomically.
    """

    association: Association
    context: AcceptedContext
    message: CStoreRQ
    spool: Spool
    fsync: bool = True
    status: int = 0x0000  # the C-STORE response status, for instances received by C-GET
    _dataset: Dataset | None = field(default=None, repr=False)
    # Made when first needed: only instances received by C-GET are acknowledged.
    _done: asyncio.Event | None = field(default=None, repr=False)

    def acknowledge(self) -> None:
        """Done with this instance: its C-STORE response (`status`) may be sent."""
        self._done_event().set()

    async def acknowledged(self) -> None:
        await self._done_event().wait()

    def _done_event(self) -> asyncio.Event:
        if self._done is None:
            self._done = asyncio.Event()
        return self._done

    @property
    def sop_class_uid(self) -> str:
        return self.message.affected_sop_class_uid

    @property
    def sop_instance_uid(self) -> str:
        return self.message.affected_sop_instance_uid

    @property
    def transfer_syntax(self) -> str:
        return self.context.transfer_syntax

    @property
    def calling_ae_title(self) -> str:
        return self.association.peer_ae_title

    @property
    def move_originator_ae_title(self) -> str | None:
        return self.message.move_originator_ae_title

    @property
    def move_originator_message_id(self) -> int | None:
        return self.message.move_originator_message_id

    @property
    def size(self) -> int:
        """Length of the data set in bytes, as received."""
        return self.spool.size

    @property
    def dataset(self) -> Dataset:
        """The data set, decoded by pydicom on first access (file meta attached)."""
        if self._dataset is None:
            with self.spool.open_part10() as f:
                self._dataset = dcmread(f, force=True)
        return self._dataset

    def dataset_bytes(self) -> bytes:
        """The data set bytes exactly as received (no file meta)."""
        return self.spool.dataset_bytes()

    async def save(self, path: str | os.PathLike[str], *, fsync: bool | None = None) -> Path:
        """Write a Part-10 file (file meta + data set bytes as received) atomically."""
        return await self.spool.save(path, fsync=self.fsync if fsync is None else fsync)
