"""Writing DIMSE messages onto one connection: each message's PDUs together, in order.

One `MessageWriter` per association. A message (command and data set) goes out under
one lock, so PDUs of two messages never interleave (PS3.8 §9.3.5); a small message is
one write, a data set is sent in batches of about a megabyte, and a Part-10 file's data
set is read from disk straight into its P-DATA-TF PDUs without being decoded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import Any

import anyio
import anyio.to_thread

from dicomnet.proto.contexts import DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
from dicomnet.proto.dimse import (
    DimseMessage,
    encode_command,
    encode_command_pdus,
    encode_small_message,
    fragment,
    max_pdv_data,
    pdata_into,
)
from dicomnet.storage import DatasetReader, Part10File

__all__ = ["MessageWriter"]

log = logging.getLogger("dicomnet")

SEND_BATCH = 1 << 20  # bytes per socket write when streaming a data set
SMALL_MESSAGE = 1 << 16  # data sets below this go in the command's P-DATA-TF PDU if they fit


class MessageWriter:
    """Encodes DIMSE messages into P-DATA-TF PDUs of at most the peer's maximum length
    and writes them. `write` is the association's guarded write (it turns a lost
    connection into the association's error); `broken` is called when a message was cut
    short after part of it went out (the association must then be aborted)."""

    def __init__(
        self,
        max_pdu_length: int,
        write: Callable[[bytes | bytearray], Any],
        broken: Callable[[BaseException], Any],
    ) -> None:
        self.max_pdu_length = max_pdu_length
        self._write = write
        self._broken = broken
        self.lock = asyncio.Lock()

    async def send(
        self,
        context_id: int,
        message: DimseMessage,
        dataset: bytes | memoryview | None,
        check: Callable[[], None],
    ) -> None:
        """Send one message (and its data set); `check` runs under the lock first and
        raises if data may not be sent any more."""
        command = encode_command(message, has_dataset=dataset is not None)
        max_pdu = self.max_pdu_length
        async with self.lock:
            check()
            if dataset is not None and len(dataset) < SMALL_MESSAGE:
                packed = encode_small_message(context_id, command, dataset, max_pdu)
                if packed is not None:
                    await self._write(packed)
                    return
            if dataset is None:
                await self._write(encode_command_pdus(context_id, command, max_pdu))
                return
            try:
                await self._send_fragments(context_id, command, dataset)
            except BaseException as exc:
                await self._broken(exc)
                raise

    async def _send_fragments(
        self, context_id: int, command: bytes, dataset: bytes | memoryview
    ) -> None:
        max_pdu = self.max_pdu_length
        pieces: Iterable[bytes | memoryview] = fragment(context_id, command, True, max_pdu)
        batch: list[bytes | memoryview] = list(pieces)
        size = 0
        for piece in fragment(context_id, dataset, False, max_pdu):
            batch.append(piece)
            size += len(piece)
            if size >= SEND_BATCH:
                await self._write(b"".join(batch))
                batch, size = [], 0
        if batch:
            await self._write(b"".join(batch))

    async def send_file(
        self,
        context_id: int,
        message: DimseMessage,
        part10: Part10File,
        progress: Callable[[int, int], Any] | None,
        check: Callable[[], None],
    ) -> None:
        """Send a message whose data set is a Part-10 file's, streamed from disk."""
        command = encode_command(message, has_dataset=True)
        # A deflated data set of odd length gets its trailing NUL pad (PS3.5 §A.5).
        pad = (
            part10.dataset_length % 2 == 1
            and part10.transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN
        )
        async with self.lock:
            check()
            try:
                await self._stream_file(context_id, command, part10, progress, pad)
            except BaseException as exc:
                await self._broken(exc)
                raise

    async def _stream_file(
        self,
        context_id: int,
        command: bytes,
        part10: Part10File,
        progress: Callable[[int, int], Any] | None,
        pad: bool,
    ) -> None:
        max_pdu = self.max_pdu_length
        per_pdv = max_pdv_data(max_pdu)
        block_size = max(1, SEND_BATCH // per_pdv) * per_pdv
        in_file = part10.dataset_length
        total = in_file + (1 if pad else 0)  # the pad byte is the buffer's own zero
        prefix = b"".join(fragment(context_id, command, True, max_pdu))
        with DatasetReader(part10) as reader:
            sent = 0
            while True:  # at least once: an empty data set is one empty last fragment
                size = min(block_size, total - sent)
                sent += size
                block, slots = pdata_into(
                    context_id, size, max_pdu, is_final=sent >= total, prefix=prefix
                )
                if size <= (1 << 16):
                    reader.fill(slots)
                else:
                    # From the page cache right here; what is not cached, in a worker thread.
                    rest = reader.fill_cached(slots)
                    if rest:
                        await anyio.to_thread.run_sync(reader.fill, rest)
                prefix = b""
                await self._write(block)
                if progress is not None:
                    progress(min(sent, in_file), in_file)
                if sent >= total:
                    break
