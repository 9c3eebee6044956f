"""The Storage service (PS3.4 Annex B, PS3.7 §9.1.1): C-STORE, both roles.

SCU: a Part-10 file is streamed from disk after its file meta, without decoding it;
a Dataset (or a file whose syntax was not accepted) is encoded in an accepted syntax,
converted by `dicomnet.transcode` where need be. SCP: the data set is spooled as it arrives
(memory up to a threshold, then a temp file) and handed to `on_store` as a
`StoreRequest`; the instances of our own C-GET are diverted to its loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import anyio
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicomnet.association import BaseAssociation, Handlers, Received
from dicomnet.errors import InvalidDatasetError, NotNegotiatedError
from dicomnet.proto.contexts import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    AcceptedContext,
    PresentationContext,
    all_storage_sop_classes,
    all_transfer_syntaxes,
)
from dicomnet.proto.dimse import CStoreRQ, CStoreRSP, DimseMessage
from dicomnet.proto.walk import MalformedDataset
from dicomnet.services.common import check, comment, status_of
from dicomnet.status import Status
from dicomnet.storage import (
    Part10File,
    Spool,
    encode_dataset,
    is_valid_uid,
    out_of_resources,
    part10_header,
    safe_file_name,
)
from dicomnet.transcode import (
    ConversionError,
    can_convert,
    conversion_target,
    convert,
    transcodes,
    why_not_convertible,
)

__all__ = ["ON_STORE", "Storage", "StorageUser", "StoreRequest"]

log = logging.getLogger("dicomnet")

ON_STORE = "on_store"  # the handler's key in `Handlers`


@dataclass(slots=True)
class StoreRequest:
    """A C-STORE-RQ with its data set (PS3.7 §9.1.1).

    The data set stays as received (spooled to memory or a temp file); `dataset`
    decodes it on first use, `save()` writes it as a Part-10 file atomically.
    """

    association: BaseAssociation
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

    def check(self) -> tuple[int, str] | None:
        """Whether the data set is one to keep, without decoding it (blocking: it may
        read the spool file). It must parse (`Spool.walk`: tags and lengths in the
        context's transfer syntax), else C000 (Cannot understand); its SOP Class and
        Instance UIDs must be the request's Affected ones, else A900 (Data Set does not
        match SOP Class), as DCMTK's storescp answers (PS3.4 §B.2.3). Returns the
        refusal (status, Error Comment), or None."""
        try:
            walked = self.spool.walk(self.transfer_syntax)
        except MalformedDataset as exc:
            log.warning("refused %s: the data set does not parse: %s", self.sop_instance_uid, exc)
            return 0xC000, f"data set does not parse: {exc}"[:64]
        if not walked.sop_class_uid or not walked.sop_instance_uid:
            return 0xC000, "no SOP Class UID or SOP Instance UID in the data set"
        for what, ours, theirs in (
            ("Instance", self.sop_instance_uid, walked.sop_instance_uid),
            ("Class", self.sop_class_uid, walked.sop_class_uid),
        ):
            if ours != theirs:
                log.warning(
                    "refused %s from %r: SOP %s UID %r in the data set, %r in the request",
                    self.sop_instance_uid,
                    self.calling_ae_title,
                    what,
                    theirs,
                    ours,
                )
                return 0xA900, f"SOP {what} UID of the data set differs from the request's"
        return None

    def dataset_bytes(self) -> bytes:
        """The data set bytes exactly as received (no file meta)."""
        return self.spool.dataset_bytes()

    async def save(self, path: str | os.PathLike[str], *, fsync: bool | None = None) -> Path:
        """Write a Part-10 file (file meta + data set bytes as received) atomically, at
        `path`; or, when `path` is a folder, in it as ``<SOP Instance UID>.dcm``: a
        name that never leads out of the folder, whatever UID the peer sent (one that is
        not a valid UID gets a name derived from it, `safe_file_name`)."""
        target = Path(path)
        if target.is_dir():
            target = target / safe_file_name(self.sop_instance_uid)
        return await self.spool.save(target, fsync=self.fsync if fsync is None else fsync)


@dataclass(frozen=True, slots=True)
class _Options:
    """What a C-STORE-RQ carries besides the instance (PS3.7 §9.3.1.1)."""

    priority: int = 0
    move_originator_ae_title: str | None = None
    move_originator_message_id: int | None = None

    def request(self, message_id: int, sop_class: str, sop_instance: str) -> CStoreRQ:
        return CStoreRQ(
            message_id,
            sop_class,
            sop_instance,
            self.priority,
            self.move_originator_ae_title,
            self.move_originator_message_id,
        )


class StorageUser(BaseAssociation):
    """What the Storage service offers the SCU."""

    async def store(
        self,
        dataset_or_path: Dataset | str | os.PathLike[str],
        *,
        progress: Callable[[int, int], Any] | None = None,
        priority: int = 0,
        move_originator_ae_title: str | None = None,
        move_originator_message_id: int | None = None,
        transfer_syntax: str | None = None,
    ) -> Status:
        """C-STORE (PS3.7 §9.1.1) of a pydicom Dataset or a Part-10 file.

        A file is streamed from disk after its file meta, without decoding it, when a
        context in its own transfer syntax was accepted; otherwise it is converted to an
        accepted one (`dicomnet.transcode`: uncompressed first; decompression needs
        `dicomnet[codecs]`), and a `ConversionError` says why when none can be had.
        `transfer_syntax`: send in this one when it was accepted (converting if need be).
        `progress(bytes_sent, total)` is called as data goes out. Returns the status
        (success or warning); a failure raises `DimseError`.
        """
        options = _Options(priority, move_originator_ae_title, move_originator_message_id)
        if isinstance(dataset_or_path, Dataset):
            return await self._store_dataset(dataset_or_path, progress, options, transfer_syntax)
        path = Path(dataset_or_path)
        try:
            part10 = Part10File.open(path, keep_contents=True)  # sent now
        except ValueError:
            part10 = None
        if part10 is not None:
            context = self.sending_context(
                part10.sop_class_uid, part10.transfer_syntax, transfer_syntax
            )
            if context.transfer_syntax == part10.transfer_syntax:
                return await self._store_file(part10, context, progress, options)
        dataset = await anyio.to_thread.run_sync(lambda: dcmread(path, force=True))
        return await self._store_dataset(dataset, progress, options, transfer_syntax, copy=False)

    async def _store_file(
        self,
        file: Part10File,
        context: AcceptedContext,
        progress: Callable[[int, int], Any] | None,
        options: _Options,
    ) -> Status:
        cid = context.context_id

        async def send(message: DimseMessage) -> None:
            await self.send_file_message(cid, message, file, progress)

        response, _ = await self.send_request(
            context,
            lambda mid: options.request(mid, file.sop_class_uid, file.sop_instance_uid),
            send,
        )
        return check(response)

    def sending_context(
        self, sop_class_uid: str, transfer_syntax: str, preferred: str | None = None
    ) -> AcceptedContext:
        """The accepted context to send an instance of `sop_class_uid` stored in
        `transfer_syntax` on: `preferred` if accepted and reachable, else its own syntax,
        else one it converts to (`dicomnet.transcode.conversion_target`). Raises
        `NotNegotiatedError` (`ConversionError` when the class was accepted) saying why."""
        if preferred is None or preferred == transfer_syntax:
            as_stored = self.context_for(sop_class_uid, transfer_syntax)
            if as_stored is not None:  # the common case, first
                return as_stored
        accepted = {
            c.transfer_syntax: c
            for c in self.contexts.values()
            if c.abstract_syntax == sop_class_uid and c.we_are_scu
        }
        if preferred in accepted and can_convert(transfer_syntax, preferred):
            return accepted[preferred]
        target = conversion_target(transfer_syntax, accepted)
        if target is not None:
            return accepted[target]
        text = (
            f"no accepted presentation context for {UID(sop_class_uid).name} "
            f"({sop_class_uid}) in {UID(transfer_syntax).name}"
        )
        if not accepted:
            raise NotNegotiatedError(f"{text}; the SOP class itself was not accepted")
        names = ", ".join(sorted(UID(ts).name for ts in accepted))
        reason = why_not_convertible(transfer_syntax, accepted)
        raise ConversionError(f"{text} (accepted: {names}), and {reason}", reason)

    async def _store_dataset(
        self,
        dataset: Dataset,
        progress: Callable[[int, int], Any] | None,
        options: _Options,
        preferred: str | None,
        *,
        copy: bool = True,
    ) -> Status:
        sop_class = str(dataset.get("SOPClassUID", "") or "")
        sop_instance = str(dataset.get("SOPInstanceUID", "") or "")
        if not sop_class or not sop_instance:
            raise InvalidDatasetError("the data set has no SOP Class UID or SOP Instance UID")
        meta = getattr(dataset, "file_meta", None)
        own_ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
        source = own_ts or EXPLICIT_VR_LITTLE_ENDIAN
        context = self.sending_context(sop_class, source, preferred)
        ts = context.transfer_syntax

        def encode() -> bytes:
            # Converting changes pixel data in place: the caller's data set stays as it was.
            converted = (
                convert(deepcopy(dataset) if copy else dataset, source, ts)
                if transcodes(source, ts)
                else dataset
            )
            return encode_dataset(converted, ts)

        data = await anyio.to_thread.run_sync(encode)
        cid = context.context_id

        async def send(message: DimseMessage) -> None:
            await self.send_message(cid, message, data)
            if progress is not None:
                progress(len(data), len(data))

        response, _ = await self.send_request(
            context, lambda mid: options.request(mid, sop_class, sop_instance), send
        )
        return check(response)


class _NullSpool(Spool):
    """Swallows a data set that will be refused (its UIDs are unusable)."""

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)


class Storage:
    """The SCP side: every storage SOP class, in every syntax, once `on_store` is set."""

    requests: ClassVar[tuple[type[Any], ...]] = (CStoreRQ,)
    inline: ClassVar[bool] = True

    def contexts(
        self, handlers: Handlers, models: tuple[str, ...]
    ) -> dict[str, PresentationContext]:
        if handlers.get(ON_STORE) is None:
            return {}
        every = all_transfer_syntaxes()
        return {
            uid: PresentationContext(uid, every, scu_role=True) for uid in all_storage_sop_classes()
        }

    def dataset_sink(
        self, association: BaseAssociation, context: AcceptedContext, message: Any
    ) -> Spool | None:
        assert isinstance(message, CStoreRQ)
        if not is_valid_uid(message.affected_sop_instance_uid) or not is_valid_uid(
            message.affected_sop_class_uid
        ):
            return _NullSpool(b"", 0)
        header = part10_header(
            message.affected_sop_class_uid,
            message.affected_sop_instance_uid,
            context.transfer_syntax,
            association.peer_ae_title,
        )
        settings = association.settings
        return Spool(header, settings.spool_threshold, settings.spool_dir)

    async def serve(self, association: BaseAssociation, request: Received) -> None:
        message = request.message
        assert isinstance(message, CStoreRQ) and request.spool is not None
        status, text = await self._perform(association, request.context, message, request.spool)
        response = CStoreRSP(
            message.message_id,
            status,
            message.affected_sop_class_uid,
            message.affected_sop_instance_uid,
            text,
        )
        await association.send_message(request.context.context_id, response)

    async def _perform(
        self,
        association: BaseAssociation,
        context: AcceptedContext,
        message: CStoreRQ,
        spool: Spool,
    ) -> tuple[int, str | None]:
        if isinstance(spool, _NullSpool):
            return 0xC000, "invalid SOP Class or Instance UID"
        if spool.error is not None:
            return _spool_failure(message, spool.error)
        if message.affected_sop_class_uid != context.abstract_syntax:
            return 0x0122, "SOP Class not accepted on this presentation context"
        instance = StoreRequest(
            association, context, message, spool, fsync=association.settings.fsync
        )
        if await association.diverted(message, instance):
            # A C-STORE sub-operation of our C-GET: its loop answers it.
            await instance.acknowledged()
            return instance.status, None
        handler = association.handlers.get(ON_STORE)
        if not context.we_are_scp or handler is None:
            return 0x0122, "SOP Class not accepted on this presentation context"
        try:
            return status_of(await handler(instance))
        except Exception as exc:
            if out_of_resources(exc):
                return _spool_failure(message, exc)
            log.exception("on_store handler failed for %s", message.affected_sop_instance_uid)
            return 0xC000, comment(exc)


def _spool_failure(message: CStoreRQ, exc: BaseException) -> tuple[int, str]:
    """A data set that could not be kept: A700 when the system is out of room (a full
    disk: PS3.4 §B.2.3 Refused: Out of Resources), else C000."""
    log.error("could not store %s: %s", message.affected_sop_instance_uid, exc)
    if out_of_resources(exc):
        return 0xA700, f"out of resources: {getattr(exc, 'strerror', None) or exc}"[:64]
    return 0xC000, comment(exc)
