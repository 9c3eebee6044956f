"""Part-10 files in and out: spooling received data sets, atomic writes, streaming reads.

- `Spool`: a received data set, in memory up to a threshold, then in a temp file that
  already starts with the Part-10 preamble and file meta (PS3.10 §7.1), so saving it is
  an fsync and a rename. A discarded spool leaves nothing behind.
- `write_atomic`: a file that appears complete under its name at once: on Linux written
  unnamed (`O_TMPFILE`) and linked in place, elsewhere a temp file renamed; the file and
  its folder fsynced when asked.
- `Part10File`: what the SCU needs of a file to send it (transfer syntax, SOP Class and
  Instance UIDs from the data set itself, the data set's byte range) without decoding it;
  `DatasetReader` reads that range into the buffers being sent.
- `encode_dataset` / `decode_dataset`: pydicom data sets to and from a transfer syntax.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import itertools
import logging
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import anyio
import anyio.to_thread
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_dataset
from pydicom.filewriter import write_dataset

from dicomnet._version import __version__
from dicomnet.errors import InvalidDatasetError
from dicomnet.proto.codec import decode_flat, encode_flat, scan_part10_head
from dicomnet.proto.contexts import (
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
)
from dicomnet.proto.walk import (
    VR_NAMES,
    ChunkSource,
    MalformedDataset,
    Walked,
    walk_bytes,
    walk_encoded,
)

__all__ = [
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
    "DatasetReader",
    "Part10File",
    "Spool",
    "decode_dataset",
    "decode_received",
    "encode_dataset",
    "fsync_directory",
    "is_valid_ae_title",
    "is_valid_uid",
    "out_of_resources",
    "part10_header",
    "safe_ae_title",
    "safe_file_name",
    "write_atomic",
]

log = logging.getLogger("dicomnet")

IMPLEMENTATION_CLASS_UID = "1.2.826.0.1.3680043.10.1452.1"
IMPLEMENTATION_VERSION_NAME = f"DICOMNET_{__version__}"[:16]


# Errors that say the system is out of room (disk, quota, memory, descriptors), not that
# the data is bad: a C-STORE failing with one is answered A700 (PS3.4 §B.2.3).
OUT_OF_RESOURCES = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.ENOMEM, errno.EMFILE, errno.ENFILE, errno.EFBIG}
)


def out_of_resources(exc: BaseException) -> bool:
    """Whether `exc` says the system is out of room (see `OUT_OF_RESOURCES`)."""
    return isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES


def is_valid_uid(uid: str) -> bool:
    """A UID per PS3.5 §9.1: digits and dots, at most 64 characters (safe as a file name)."""
    # Components of digits joined by single dots; no regular expression: this runs for
    # every C-STORE.
    return (
        0 < len(uid) <= 64
        and uid.isascii()
        and uid.replace(".", "").isdigit()
        and uid[0] != "."
        and uid[-1] != "."
        and ".." not in uid
    )


def is_valid_ae_title(title: str) -> bool:
    """An AE title per PS3.5 Table 6.2-1 (leading and trailing spaces removed): 1 to 16
    characters of the default repertoire, no backslash, no control character."""
    return 0 < len(title) <= 16 and all(" " <= c <= "~" and c != "\\" for c in title)


def safe_ae_title(title: str) -> str:
    """`title` made a valid AE value for a file's meta: each character that may not be
    in an AE (a control character, a backslash, non-ASCII) becomes ``_``."""
    cleaned = "".join(c if " " <= c <= "~" and c != "\\" else "_" for c in title.strip())
    return cleaned[:16].strip()


def safe_file_name(uid: str, suffix: str = ".dcm") -> str:
    """A file name for the instance `uid` that stays in its folder whatever a peer sent:
    ``<uid><suffix>`` for a valid UID (PS3.5 §9.1: digits and dots), else a name derived
    from a hash of it (``invalid-uid-<sha256>``), which is logged."""
    if is_valid_uid(uid):
        return f"{uid}{suffix}"
    digest = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()[:40]
    name = f"invalid-uid-{digest}{suffix}"
    log.warning("SOP Instance UID %r is not a valid UID: saved as %s", uid, name)
    return name


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element of group 0002 (PS3.10 §7.1)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", 2, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 2, element, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", errors="replace")
    return raw + pad if len(raw) % 2 else raw


def part10_header(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, source_ae_title: str = ""
) -> bytes:
    """Preamble, 'DICM' and the File Meta Information group (PS3.10 §7.1)."""
    before, after = _meta_around_instance(
        sop_class_uid, transfer_syntax, safe_ae_title(source_ae_title)
    )
    instance = _meta_element(0x0003, b"UI", _padded(sop_instance_uid, b"\x00"))
    group_length = _GROUP_LENGTH.pack(2, 0, b"UL", 4, len(before) + len(instance) + len(after))
    return b"".join((_PREAMBLE, group_length, before, instance, after))


_PREAMBLE = b"\x00" * 128 + b"DICM"
_GROUP_LENGTH = struct.Struct("<HH2sHI")


@functools.lru_cache(maxsize=256)
def _meta_around_instance(
    sop_class_uid: str, transfer_syntax: str, source_ae_title: str
) -> tuple[bytes, bytes]:
    """The file meta elements before and after (0002,0003): the same for every instance
    of a SOP class, transfer syntax and source."""
    before = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _padded(sop_class_uid, b"\x00")),
    ]
    after = [
        _meta_element(0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    if source_ae_title:
        after.append(_meta_element(0x0016, b"AE", _padded(source_ae_title.strip(), b" ")))
    return b"".join(before), b"".join(after)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()


class _DirectorySyncs:
    """Group commit of directory fsyncs (PS3.4 leaves durability to the SCP; this is ours).

    A thread that renamed a file into a directory takes a ticket and returns once an fsync
    of that directory has *started* after its ticket: one fsync then covers every rename
    made before it, so concurrent stores into one folder share it instead of queueing one
    each.
    """

    def __init__(self) -> None:
        self._condition = threading.Condition()
        # directory -> [last ticket issued, last ticket covered, an fsync is running]
        self._state: dict[Path, list[Any]] = {}

    def sync(self, directory: Path) -> None:
        with self._condition:
            state = self._state.setdefault(directory, [0, 0, False])
            state[0] += 1
            ticket = state[0]
            while state[1] < ticket:
                if state[2]:
                    self._condition.wait()
                    continue
                state[2] = True
                covers = state[0]
                self._condition.release()
                try:
                    _fsync_directory_now(directory)
                finally:
                    self._condition.acquire()
                    state[2] = False
                    state[1] = max(state[1], covers)
                    self._condition.notify_all()
            if not state[2] and state[1] == state[0] and self._state.get(directory) is state:
                del self._state[directory]


_directory_syncs = _DirectorySyncs()


def _fsync_directory(directory: Path) -> None:
    _directory_syncs.sync(directory)


def fsync_directory(directory: Path) -> None:
    """Make `directory`'s entries durable (fsync; shared with concurrent callers)."""
    _fsync_directory(directory)


def _fsync_directory_now(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


_temp_names = itertools.count()


def _make_folder(folder: str, fsync: bool) -> None:
    """Create `folder` (and its parents); with `fsync`, make its entry durable too."""
    os.makedirs(folder, exist_ok=True)
    if fsync:
        _fsync_directory(Path(folder).parent)


def _with_folder(folder: str, fsync: bool, write: Callable[[], None]) -> None:
    """Run `write`; if `folder` does not exist (never made, or deleted while serving),
    create it and run `write` again. Nothing is remembered between calls: the happy path
    costs no system call of its own."""
    try:
        write()
    except FileNotFoundError:
        if not folder or os.path.isdir(folder):
            raise
        _make_folder(folder, fsync)
        write()


# At most this many buffers per gathering write (POSIX guarantees IOV_MAX >= 16).
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024) if hasattr(os, "sysconf") else 16
# At most this many bytes per write system call. One 512 KB write costs several times the
# system time of eight 64 KiB ones on Linux 6.x (ext4 takes large page-cache folios for a
# large write, and these come cold from the page allocator); benchmarks/RESULTS.md.
_WRITE_BYTES = 64 * 1024


def _write_all(fd: int, chunks: list[bytes | memoryview]) -> None:
    """Write every chunk, in order, in system calls of at most `_WRITE_BYTES`: small chunks
    gathered into one writev(), large ones cut."""
    batch: list[memoryview] = []
    size = 0
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while view:
            piece, view = view[: _WRITE_BYTES - size], view[_WRITE_BYTES - size :]
            batch.append(piece)
            size += len(piece)
            if size == _WRITE_BYTES or len(batch) == _IOV_MAX:
                _write_batch(fd, batch)
                batch, size = [], 0
    if batch:
        _write_batch(fd, batch)


def _write_batch(fd: int, views: list[memoryview]) -> None:
    """Write `views` in order, however short the system's writes are."""
    if not hasattr(os, "writev"):  # pragma: no cover - Windows
        for view in views:
            while view:
                view = view[os.write(fd, view) :]
        return
    while views:
        written = os.writev(fd, views)
        # Drop what was written; a partial write leaves the rest of a buffer.
        done = 0
        while done < len(views) and written >= len(views[done]):
            written -= len(views[done])
            done += 1
        views = views[done:]
        if written:
            views[0] = views[0][written:]


# Linux: a file can be written unnamed (O_TMPFILE) and then linked under its name. False
# once the file system (or a missing /proc) said no: temp file and rename then.
_unnamed_files = hasattr(os, "O_TMPFILE") and os.link in os.supports_dir_fd
_UNNAMED_REFUSED = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}  # O_TMPFILE not here
_LINK_REFUSED = {errno.ENOENT, errno.EXDEV, errno.EOPNOTSUPP}  # no /proc, or no links here
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}


def write_atomic(
    path: str | os.PathLike[str],
    chunks: list[bytes | memoryview],
    fsync: bool = True,
    *,
    replace: bool = True,
    sync_folder: bool = True,
) -> None:
    """Write `chunks` to `path` atomically: the complete file (fsynced first, if asked)
    appears under its name at once, replacing any file of that name; unless not
    `replace`: then `FileExistsError` if there is one, and nothing is left behind. With
    `fsync`, the folder is fsynced too (the name made durable) unless not `sync_folder`:
    for a file that a caller links elsewhere and makes durable there."""
    # Plain strings here: this runs once per stored instance, and pathlib costs more
    # than the system calls around it.
    path = os.fspath(path)
    folder = os.path.dirname(path)
    _with_folder(folder, fsync, lambda: _write_file(path, chunks, fsync, replace))
    if fsync and sync_folder:
        _fsync_directory(Path(folder or "."))


def _write_file(path: str, chunks: list[bytes | memoryview], fsync: bool, replace: bool) -> None:
    folder, name = os.path.split(path)
    if not (
        _unnamed_files and _write_unnamed_then_link(path, folder or ".", chunks, fsync, replace)
    ):
        tmp = os.path.join(folder, f".{name}.{os.getpid()}.{next(_temp_names)}.part")
        # O_EXCL: never write into someone else's file; mode 0o666 less the umask.
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        fd = os.open(tmp, flags, 0o666)
        try:
            try:
                _write_all(fd, chunks)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            _place(tmp, path, replace)
        except BaseException:
            _unlink_quietly(tmp)
            raise


def _place(tmp: str, path: str, replace: bool) -> None:
    """Give the complete file `tmp` the name `path`: replacing one of that name, or
    not (`FileExistsError`, `tmp` left for the caller to remove)."""
    if replace:
        os.replace(tmp, path)
    else:
        _link_spool(tmp, path)


def _write_unnamed_then_link(
    path: str, folder: str, chunks: list[bytes | memoryview], fsync: bool, replace: bool = True
) -> bool:
    """Write an unnamed file in `folder` (O_TMPFILE), then give it its name with one
    linkat(). The inode is allocated outside the folder's lock, and the folder is locked
    once per file instead of twice (create, rename): what concurrent writers (`serve
    --workers N`) otherwise contend for. False if the system cannot; nothing is left."""
    global _unnamed_files
    try:
        fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as exc:
        if exc.errno not in _UNNAMED_REFUSED:
            raise
        _unnamed_files = False
        return False
    try:
        _write_all(fd, chunks)
        if fsync:
            os.fsync(fd)
        # linkat(AT_SYMLINK_FOLLOW) of the descriptor's /proc entry; a `src_dir_fd` (any:
        # the source path is absolute) is what makes os.link call linkat with that flag.
        source = f"/proc/self/fd/{fd}"
        try:
            os.link(source, path, src_dir_fd=fd)
        except FileExistsError:
            if not replace:
                raise
            # Stored before: link under a temp name, then replace the old file with it.
            name = os.path.basename(path)
            tmp = os.path.join(folder, f".{name}.{os.getpid()}.{next(_temp_names)}.part")
            os.link(source, tmp, src_dir_fd=fd)
            try:
                os.replace(tmp, path)
            except BaseException:
                _unlink_quietly(tmp)
                raise
        except OSError as exc:
            if exc.errno not in _LINK_REFUSED:
                raise
            _unnamed_files = False
            return False
    finally:
        os.close(fd)
    return True


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class Spool:
    """A data set arriving in fragments: memory up to `threshold` bytes, then a temp file.

    The temp file (in `directory`, created lazily) starts with `header` (preamble + file
    meta), so `save()` on the same file system renames it into place without a copy.
    In memory, read-only fragments (the received PDUs' own buffers) are kept as they are,
    not copied, and written out with one gathering write. On disk, fragments gather up
    to `WRITE_BATCH` bytes and `write_pending` (which a caller on an event loop runs in a
    worker thread, see `needs_writing`) writes them: the loop never waits for the disk.
    """

    WRITE_BATCH = 1 << 20

    def __init__(self, header: bytes, threshold: int, directory: Path | None = None) -> None:
        self.header = header
        self.threshold = threshold
        self.directory = directory
        self.size = 0
        self._memory: list[bytes | memoryview] | None = []
        self._file: BinaryIO | None = None
        self._path: Path | None = None
        self._owned = True  # False once the temp file was renamed to a saved file
        self._pending: list[bytes | memoryview] = []  # on disk: not written yet
        self._pending_size = 0
        self.complete = False
        # Why the data set could not be kept (e.g. ENOSPC while spooling to disk): the rest
        # of it is then only counted, and the C-STORE is answered with a failure.
        self.error: OSError | None = None

    @property
    def on_disk(self) -> bool:
        return self._path is not None

    def write(self, data: bytes | memoryview) -> None:
        if self.error is not None:
            self.size += len(data)
            return
        if not isinstance(data, bytes) and not (isinstance(data, memoryview) and data.readonly):
            data = bytes(data)  # kept for a while: a buffer its owner may change is copied
        if self._memory is not None:
            if self.size + len(data) <= self.threshold:
                self._memory.append(data)
                self.size += len(data)
                return
            try:
                self._spill()
            except OSError as exc:
                self._failed(exc)
                self.size += len(data)
                return
        self.size += len(data)
        self._pending.append(data)
        self._pending_size += len(data)

    @property
    def needs_writing(self) -> bool:
        """Whether `WRITE_BATCH` bytes or more wait for `write_pending`."""
        return self._pending_size >= self.WRITE_BATCH

    def write_pending(self) -> None:
        """Write to the temp file what `write` gathered (blocking: may wait for the disk)."""
        pending, self._pending, self._pending_size = self._pending, [], 0
        if self._file is None or self.error is not None:
            return
        try:
            _write_all(self._file.fileno(), pending)
        except OSError as exc:
            self._failed(exc)

    def _failed(self, exc: OSError) -> None:
        """Spooling failed (a full disk, ...): drop what was spooled, keep counting."""
        self.error = exc
        try:
            self.discard()
        except OSError:  # closing flushes, which fails the same way; the file goes anyway
            if self._path is not None:
                _unlink_quietly(str(self._path))
                self._path = None
            self._file = None

    def _spill(self) -> None:
        directory = self.directory or Path(tempfile.gettempdir())
        directory.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".dicomnet-", suffix=".part", dir=directory)
        self._path = Path(name)
        self._file = os.fdopen(fd, "wb")
        os.fchmod(fd, _FILE_MODE)
        memory, self._memory = self._memory, None
        assert memory is not None
        # Written by `write_pending` (to the descriptor: nothing goes through the file
        # object's buffer), with what follows.
        self._pending = [self.header, *memory]
        self._pending_size = sum(len(chunk) for chunk in self._pending)

    def finish(self) -> None:
        """The last fragment has arrived."""
        self.complete = True
        if self._pending:
            self.write_pending()  # what a caller did not write in a thread is written now
        if self._file is not None and self.error is None:
            try:
                self._file.flush()
            except OSError as exc:
                self._failed(exc)

    def discard(self) -> None:
        """Drop everything; no file is left behind."""
        self._memory = None
        self._pending, self._pending_size = [], 0
        if self._file is not None:
            file, self._file = self._file, None
            try:
                file.close()
            except OSError:  # its last buffered bytes could not be written: no matter
                pass
        if self._path is not None:
            try:
                self._path.unlink()
            except FileNotFoundError:
                pass
            self._path = None

    def dataset_bytes(self) -> bytes:
        """The data set bytes exactly as received."""
        if self._memory is not None:
            return b"".join(self._memory)
        if self._path is None:
            raise RuntimeError("the data set is only available while its handler runs")
        with open(self._path, "rb") as f:
            f.seek(len(self.header))
            return f.read()

    def open_part10(self) -> BinaryIO:
        """A readable Part-10 file object (header + data set)."""
        if self._memory is not None:
            return io.BytesIO(b"".join([self.header, *self._memory]))
        if self._path is None:
            raise RuntimeError("the data set is only available while its handler runs")
        return open(self._path, "rb")

    def walk(self, transfer_syntax: str) -> Walked:
        """Walk the data set's structure (`dicomnet.proto.walk`) without decoding it: over
        the memory buffers, or over the spool file, seeking past long values (pixel data).
        A deflated data set (PS3.5 §A.5) is inflated as it is walked, never held whole.
        Blocking (file reads); raises `MalformedDataset`."""
        if self._memory is not None:
            return walk_encoded(ChunkSource(self._memory), transfer_syntax)
        if self._path is None:
            raise RuntimeError("the data set is only available while its handler runs")
        if self._file is not None:
            self._file.flush()
        with open(self._path, "rb") as f:
            f.seek(len(self.header))
            return walk_encoded(_FileSource(f, self.size), transfer_syntax)

    def save_now(
        self, path: str, *, fsync: bool = True, replace: bool = True, sync_folder: bool = True
    ) -> str:
        """`save_to()`, blocking (for a caller already in a worker thread). Not
        `replace`: `FileExistsError` if `path` exists, which is left as it is. Not
        `sync_folder`: the file is fsynced, its folder not (see `write_atomic`)."""
        if self.error is not None:
            raise self.error
        return self._save_sync(path, fsync, replace, sync_folder)

    def _save_sync(
        self, path: str, fsync: bool, replace: bool = True, sync_folder: bool = True
    ) -> str:
        if self._memory is not None:
            write_atomic(
                path, [self.header, *self._memory], fsync, replace=replace, sync_folder=sync_folder
            )
            return path
        assert self._path is not None and self._file is not None
        self._file.flush()
        if fsync:
            os.fsync(self._file.fileno())
        spooled = str(self._path)
        try:
            _with_folder(os.path.dirname(path), fsync, lambda: _place(spooled, path, replace))
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            # Another file system: copy through a temp file next to the target.
            with open(self._path, "rb") as src:
                chunks: list[bytes | memoryview] = []
                while block := src.read(1 << 20):
                    chunks.append(block)
            write_atomic(path, chunks, fsync, replace=replace, sync_folder=sync_folder)
            return path
        saved = Path(path)
        if fsync and sync_folder:
            _fsync_directory(saved.parent)
        # The spool now lives at `path`; keep reading from there.
        self._path = saved
        self._file.close()
        self._file = open(saved, "rb+")
        self._file.seek(0, os.SEEK_END)
        self._owned = False
        return path

    async def save(self, path: str | os.PathLike[str], *, fsync: bool = True) -> Path:
        """Write the Part-10 file atomically (see `write_atomic`) at `path`."""
        return Path(await self.save_to(os.fspath(path), fsync=fsync))

    async def save_to(self, path: str, *, fsync: bool = True) -> str:
        """`save()` to a path given as a string, returned as given (no pathlib: a
        server calls this once per stored instance)."""
        if self.error is not None:
            raise self.error
        if self._memory is not None and not fsync and self.size < (1 << 20):
            # Small and not flushed to disk: quicker here than a trip to a worker thread.
            return self._save_sync(path, fsync)
        if self._path is not None and not self._owned:
            # Already moved into place once: copy from there.
            if Path(path).resolve() == self._path.resolve():
                return path
            src = self._path
            await anyio.to_thread.run_sync(_copy_atomic, src, path, fsync)
            return path
        return await anyio.to_thread.run_sync(self._save_sync, path, fsync)

    def close(self) -> None:
        """Release the spool after the handler is done; delete an unsaved temp file."""
        if not self._owned:
            if self._file is not None:
                self._file.close()
                self._file = None
            self._memory = None
            return
        self.discard()


class _FileSource:
    """A spool file's data set: `size` bytes from where the file is now."""

    def __init__(self, file: BinaryIO, size: int) -> None:
        self._file = file
        self._left = size

    def read(self, size: int) -> bytes:
        data = self._file.read(min(size, self._left))
        self._left -= len(data)
        return data

    def skip(self, size: int) -> int:
        size = max(0, min(size, self._left))
        self._file.seek(size, os.SEEK_CUR)
        self._left -= size
        return size


def _link_spool(spooled: str, path: str) -> None:
    """Move a spool file to `path` unless a file is there (`FileExistsError`, the spool
    file left for the caller to remove)."""
    try:
        os.link(spooled, path)  # fails if `path` exists: no window where both could win
    except OSError as exc:
        if isinstance(exc, FileExistsError) or exc.errno not in _NO_HARD_LINKS:
            raise
        if os.path.exists(path):  # pragma: no cover - file systems without hard links
            raise FileExistsError(errno.EEXIST, "already stored", path) from None
        os.replace(spooled, path)
        return
    os.unlink(spooled)


def _copy_atomic(src: Path, target: str, fsync: bool) -> None:
    with open(src, "rb") as f:
        data = f.read()
    write_atomic(target, [data], fsync)


_SOP_TAGS = [0x00080016, 0x00080018]
# Bytes read from the start of a file to find its file meta and SOP UIDs without pydicom.
_HEAD_LENGTH = 8192


def _past_sop_instance_uid(tag: Any, vr: str | None, length: int) -> bool:
    return int(tag) > 0x00080018


@dataclass(frozen=True, slots=True)
class Part10File:
    """A Part-10 file as the SCU sends it: its data set streamed from `offset` to the end."""

    path: Path
    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    offset: int
    size: int
    # The whole file, when `open(keep_contents=True)` read it all with its head (a small
    # file): sent from memory then, without opening the file again.
    contents: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def dataset_length(self) -> int:
        return self.size - self.offset

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, keep_contents: bool = False) -> Part10File:
        """Read only the file meta and the SOP Class/Instance UIDs of the data set.

        `keep_contents`: for a file about to be sent, keep it whole when the head read
        it all (at most 8 KiB), so that it is sent without opening it again. (Not for
        files opened ahead of sending, e.g. to choose the contexts: a million small
        files would stay in memory.) Raises `InvalidDatasetError` (a `ValueError`) for a
        file that is not Part-10.
        """
        p = Path(path)
        with open(p, "rb") as f:
            head = f.read(_HEAD_LENGTH)
            size = os.fstat(f.fileno()).st_size
            if len(head) < 132 or head[128:132] != b"DICM":
                f.seek(0)
                return cls._open_without_meta(p, f, head, size)
            scanned = scan_part10_head(head)
            if scanned is not None and scanned[1] and scanned[2]:
                contents = head if keep_contents and len(head) == size else None
                return cls(p, scanned[0], scanned[1], scanned[2], scanned[3], size, contents)
            f.seek(132)
            return cls._open_with_pydicom(p, f, size)

    @classmethod
    def _open_without_meta(cls, p: Path, f: BinaryIO, head: bytes, size: int) -> Part10File:
        """A data set written without preamble and file meta (as some systems keep
        them): its transfer syntax is told by its first element, of group 0008 (implicit
        or explicit VR little endian, explicit VR big endian), as DCMTK's storescu does."""
        syntax = _syntax_of_bare_dataset(head)
        if syntax is None:
            raise InvalidDatasetError(f"{p} is not DICOM (no 'DICM' prefix, no data set)")
        try:
            ds = _read_to_sop_instance_uid(f, syntax)
        except Exception as exc:
            raise InvalidDatasetError(f"{p} is not DICOM: {exc}") from None
        sop_class = str(ds.get("SOPClassUID", "") or "")
        sop_instance = str(ds.get("SOPInstanceUID", "") or "")
        if not sop_class or not sop_instance:
            raise InvalidDatasetError(f"{p} has no SOP Class UID or SOP Instance UID")
        return cls(p, syntax, sop_class, sop_instance, 0, size)

    @classmethod
    def _open_with_pydicom(cls, p: Path, f: BinaryIO, size: int) -> Part10File:
        """What `open` does for files the quick scan leaves alone (pydicom reads them)."""
        meta = _read_file_meta_info(f)
        offset = f.tell()
        transfer_syntax = str(getattr(meta, "TransferSyntaxUID", "") or "")
        if not transfer_syntax:
            raise InvalidDatasetError(f"{p} has no Transfer Syntax UID in its file meta")
        ds: Dataset
        if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
            ds = dcmread(p, stop_before_pixels=True, specific_tags=_SOP_TAGS, force=True)
        else:
            ds = _read_to_sop_instance_uid(f, transfer_syntax)
        sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
        sop_instance = str(
            ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "")
        )
        if not sop_class or not sop_instance:
            raise InvalidDatasetError(f"{p} has no SOP Class UID or SOP Instance UID")
        return cls(p, transfer_syntax, sop_class, sop_instance, offset, size)


def _read_to_sop_instance_uid(f: BinaryIO, transfer_syntax: str) -> Dataset:
    """The data set at `f`, read only up to its SOP Instance UID (0008,0018)."""
    return read_dataset(
        f,
        transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN,
        transfer_syntax != EXPLICIT_VR_BIG_ENDIAN,
        stop_when=_past_sop_instance_uid,
        defer_size=256,
    )


def _syntax_of_bare_dataset(head: bytes) -> str | None:
    """The transfer syntax of a data set without file meta, from its first element (a
    group 0008 one, as every composite instance starts); None if it does not start so."""
    if len(head) < 8:
        return None
    if head[0:2] == b"\x08\x00":
        return EXPLICIT_VR_LITTLE_ENDIAN if head[4:6] in VR_NAMES else IMPLICIT_VR_LITTLE_ENDIAN
    if head[0:2] == b"\x00\x08" and head[4:6] in VR_NAMES:
        return EXPLICIT_VR_BIG_ENDIAN
    return None


# Linux: preadv2() with RWF_NOWAIT reads only what the page cache holds, never waiting for
# the disk, so a cached file can be read on the event loop without a worker thread.
_READ_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
# A file system that cannot serve a no-wait read says so with one of these.
_NOWAIT_REFUSED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})


class DatasetReader:
    """Reads a Part-10 file's data set bytes, in order, into buffers the caller gives
    (the PDUs being built), so they are copied once on their way to the socket."""

    def __init__(self, part10: Part10File) -> None:
        self.path = part10.path
        self.position = part10.offset
        self._end = part10.offset + part10.dataset_length
        # A small file `Part10File.open` read whole is not opened again.
        self._contents = part10.contents
        self._file: io.FileIO | None = None
        self._positional = hasattr(os, "preadv")
        self._cached_reads = _READ_NOWAIT is not None
        if self._contents is not None:
            return
        self._file = open(part10.path, "rb", buffering=0)
        self._fd = self._file.fileno()
        if not self._positional:  # pragma: no cover - Windows, macOS
            self._file.seek(self.position)

    def __enter__(self) -> DatasetReader:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._file is not None:
            self._file.close()

    def fill(self, views: list[memoryview]) -> None:
        """Fill `views` in order with the next bytes; past the end of the data set they
        are left as they are (a pad byte). May wait for the disk."""
        for view in views:
            self._fill(view, 0)

    def fill_cached(self, views: list[memoryview]) -> list[memoryview]:
        """Fill `views` in order from the page cache, never waiting for the disk; returns
        what is left to `fill()` (in a worker thread): nothing when all was cached."""
        if self._contents is not None:
            self.fill(views)
            return []
        if not self._cached_reads:
            return views
        assert _READ_NOWAIT is not None
        for i, view in enumerate(views):
            start = self.position
            try:
                self._fill(view, _READ_NOWAIT)
            except OSError as exc:
                if exc.errno in _NOWAIT_REFUSED:
                    self._cached_reads = False
                elif exc.errno != errno.EAGAIN:
                    raise
                return [view[self.position - start :], *views[i + 1 :]]
        return []

    def _fill(self, view: memoryview, flags: int) -> None:
        want = min(len(view), self._end - self.position)
        if self._contents is not None:
            view[:want] = self._contents[self.position : self.position + want]
            self.position += want
            return
        assert self._file is not None
        while want:
            part = view[:want]
            if self._positional:
                got = os.preadv(self._fd, [part], self.position, flags)
            else:  # pragma: no cover - Windows, macOS
                got = self._file.readinto(part) or 0
            if not got:
                raise OSError(f"{self.path} changed while it was being sent")
            view = view[got:]
            self.position += got
            want -= got


def encode_dataset(dataset: Dataset, transfer_syntax: str) -> bytes:
    """Encode `dataset` (no file meta) in `transfer_syntax` (PS3.5 §10; Annex A.5 deflate)."""
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    data = encode_flat(dataset, implicit) if little else None
    if data is None:
        buffer = DicomBytesIO()
        buffer.is_little_endian = little
        buffer.is_implicit_VR = implicit
        write_dataset(buffer, dataset)
        data = buffer.getvalue()
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        compressor = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
        if len(data) % 2:
            data += b"\x00"
    return data


# A data set decoded in memory (an identifier, an N-service data set, a C-FIND response)
# inflates to at most this many bytes.
MAX_INFLATED = 64 << 20


def _inflate(raw: bytes) -> bytes:
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    out = inflater.decompress(raw, MAX_INFLATED + 1)
    if len(out) > MAX_INFLATED:
        raise MalformedDataset(f"deflated data set larger than {MAX_INFLATED >> 20} MiB")
    return out


def decode_dataset(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """Decode data set bytes received in `transfer_syntax` (PS3.5 §10); a `MalformedDataset`
    (a `ValueError`) when its structure does not parse."""
    raw = bytes(data)
    if transfer_syntax == DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN:
        raw = _inflate(raw)
    implicit = transfer_syntax == IMPLICIT_VR_LITTLE_ENDIAN
    little = transfer_syntax != EXPLICIT_VR_BIG_ENDIAN
    if little:
        flat = decode_flat(raw, implicit)
        if flat is not None:
            return flat
    # Sequences, or something odd: its structure (and nesting depth) is checked before
    # pydicom reads it, so a peer's data set nested a thousand deep is a MalformedDataset,
    # not a RecursionError.
    walk_bytes(raw, implicit=implicit, little=little)
    fp = io.BytesIO(raw)
    dataset = read_dataset(fp, implicit, little)
    dataset.set_original_encoding(implicit, little)
    return dataset


def decode_received(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """`decode_dataset`, every element's value converted now (nested ones too), so that an
    element that cannot be read fails here, where the SCP answers it as an undecodable
    identifier or data set, and not later inside a handler (PS3.7 §9.1.2.1.6, §10.1.1)."""
    dataset = decode_dataset(data, transfer_syntax)
    for _ in dataset.iterall():
        pass
    return dataset
