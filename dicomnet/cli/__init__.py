"""The `dicomnet` command line: echo, store, serve."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread

from dicomnet._version import __version__
from dicomnet.client import connect
from dicomnet.errors import DicomNetError, DimseError
from dicomnet.proto.contexts import (
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    ContextCount,
    PresentationContext,
    contexts_for_instances,
)
from dicomnet.storage import Part10File

__all__ = ["main"]

log = logging.getLogger("dicomnet")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--aet", default="DICOMNET", help="our AE title (default: DICOMNET)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log associations")
    parser.add_argument(
        "--debug", action="store_true", help="log association and DIMSE traffic in detail"
    )


def _remote(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("host", help="the peer's host name or address")
    parser.add_argument("port", type=int, help="the peer's TCP port")
    parser.add_argument("--aec", default="ANY-SCP", help="the peer's AE title (default: ANY-SCP)")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="connect/ARTIM timeout, seconds (default 30)"
    )
    parser.add_argument(
        "--dimse-timeout", type=float, default=60.0, help="DIMSE response timeout (default 60)"
    )


def _query(
    parser: argparse.ArgumentParser, models: tuple[str, ...] = ("patient", "study", "mwl")
) -> None:
    parser.add_argument(
        "-k",
        "--key",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="a query key: a keyword or gggg,eeee, with an optional value (repeatable); "
        "nested: SequenceKeyword[0].Keyword=VALUE",
    )
    parser.add_argument(
        "--model", choices=models, default="study", help="information model (default study)"
    )
    parser.add_argument(
        "--level",
        type=str.upper,
        choices=("PATIENT", "STUDY", "SERIES", "IMAGE"),
        help="Query/Retrieve Level (default: the model's top level)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dicomnet", description="DICOM networking: verification, storage and serving."
    )
    parser.add_argument("--version", action="version", version=f"dicomnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    echo = sub.add_parser("echo", help="C-ECHO a peer; exit 0 only if every echo succeeded")
    _remote(echo)
    _common(echo)
    echo.add_argument("--count", type=int, default=1, help="number of C-ECHOs (default 1)")

    store = sub.add_parser("store", help="send files and folders (recursive) with C-STORE")
    _remote(store)
    _common(store)
    store.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    store.add_argument(
        "--concurrency", type=int, default=1, help="associations in parallel (default 1)"
    )
    store.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )

    find = sub.add_parser("find", help="C-FIND: query a peer")
    _remote(find)
    _common(find)
    _query(find)
    find.add_argument("--json", action="store_true", help="one DICOM JSON object a line")

    move = sub.add_parser("move", help="C-MOVE: have a peer send instances to an AE")
    _remote(move)
    _common(move)
    _query(move, models=("patient", "study"))
    move.add_argument("--dest", required=True, metavar="AET", help="the move destination")

    get = sub.add_parser("get", help="C-GET: retrieve instances into a folder")
    _remote(get)
    _common(get)
    _query(get, models=("patient", "study"))
    get.add_argument("--out", required=True, metavar="DIR", help="folder for the instances")
    get.add_argument(
        "--via",
        choices=("get", "move"),
        default="get",
        help="C-GET (default), or C-MOVE to a listener of ours (the peer must know --aet "
        "at --listen-host/--listen-port as a move destination)",
    )
    get.add_argument("--listen-host", default="127.0.0.1", help="listener address (--via move)")
    get.add_argument(
        "--listen-port", type=int, default=11113, help="listener port (--via move, 11113)"
    )

    serve = sub.add_parser(
        "serve", help="run a storage and query/retrieve SCP over what it receives"
    )
    _common(serve)
    serve.set_defaults(aet="DICOMNET")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=11112, help="TCP port (default 11112)")
    serve.add_argument(
        "--storage", default="./dicomnet-storage", help="folder for received instances"
    )
    serve.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="AET=HOST:PORT",
        help="a known peer (move destination), repeatable",
    )
    serve.add_argument(
        "--allow",
        action="append",
        default=None,
        metavar="AET",
        help="accept only these calling AE titles (repeatable)",
    )
    serve.add_argument(
        "--max-associations", type=int, default=None, help="refuse associations past N"
    )
    serve.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer C-STORE only once the file and its folder entry are on disk (default); "
        "--no-fsync answers sooner and is less durable",
    )
    serve.add_argument(
        "--idle-timeout", type=float, default=600.0, help="abort silent associations (600 s)"
    )
    serve.add_argument(
        "--reindex", action="store_true", help="rebuild the index from the stored files first"
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve with N processes on one port (SO_REUSEPORT), to use every core",
    )
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-slot", type=int, default=0, help=argparse.SUPPRESS)

    from dicomnet.cli import bench

    bench.add_parser(sub)

    index = sub.add_parser("index", help="rebuild the query/retrieve index of a storage folder")
    index.add_argument("storage", metavar="DIR", help="the folder `dicomnet serve` stores to")
    index.add_argument("-v", "--verbose", action="store_true", help="log progress")
    index.add_argument("--debug", action="store_true", help="log in detail")
    return parser


def _configure_logging(args: argparse.Namespace) -> None:
    level = logging.WARNING
    if getattr(args, "verbose", False):
        level = logging.INFO
    if getattr(args, "debug", False):
        level = logging.DEBUG
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )


def _connect(args: argparse.Namespace, contexts: Sequence[PresentationContext]) -> Any:
    """`connect()` with the command line's peer, titles and timeouts."""
    return connect(
        args.host,
        args.port,
        aet=args.aet,
        aec=args.aec,
        contexts=contexts,
        connect_timeout=args.timeout,
        artim_timeout=args.timeout,
        dimse_timeout=args.dimse_timeout,
    )


# --- echo ------------------------------------------------------------------------------------


async def _echo(args: argparse.Namespace) -> int:
    from dicomnet.proto.contexts import VERIFICATION

    failures = 0
    async with _connect(args, [PresentationContext(VERIFICATION)]) as association:
        for _ in range(max(1, args.count)):
            start = time.perf_counter()
            try:
                status = await association.echo()
            except DimseError as exc:
                failures += 1
                print(f"C-ECHO failed: {exc}")
                continue
            elapsed = (time.perf_counter() - start) * 1000
            print(
                f"C-ECHO {args.aec}@{args.host}:{args.port}: {status.description} "
                f"({status}) in {elapsed:.1f} ms"
            )
    return 1 if failures else 0


# --- store -----------------------------------------------------------------------------------


@dataclass
class _StoreTally:
    total: int
    total_bytes: int
    sent: int = 0
    warning: int = 0
    failed: int = 0
    bytes_done: int = 0
    failures: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    last_draw: float = 0.0
    show: bool = False

    def draw(self, force: bool = False) -> None:
        if not self.show:
            return
        now = time.perf_counter()
        if not force and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        done = self.sent + self.warning + self.failed
        width = 30
        filled = int(width * done / self.total) if self.total else width
        elapsed = max(now - self.started, 1e-9)
        rate = self.bytes_done / elapsed / 1e6
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} files "
            f"{self.bytes_done / 1e6:.1f} MB {rate:.1f} MB/s failed {self.failed}  "
        )
        sys.stderr.flush()


def _collect(paths: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files to send (folders walked recursively, sorted) and errors for missing paths."""
    files: list[Path] = []
    errors: list[str] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files.extend(Path(root) / name for name in sorted(names))
        elif path.is_file():
            files.append(path)
        else:
            errors.append(f"{raw}: no such file or folder")
    return files, errors


def _contexts_for(files: Sequence[Part10File]) -> list[PresentationContext]:
    return contexts_for_instances((f.sop_class_uid, f.transfer_syntax) for f in files)


def _batches(files: list[Part10File]) -> list[tuple[list[PresentationContext], list[Part10File]]]:
    """Split the files so that each batch needs at most 128 presentation contexts."""
    batches: list[tuple[list[PresentationContext], list[Part10File]]] = []
    current: list[Part10File] = []
    count = ContextCount()
    for f in files:
        if current and count.with_(f.sop_class_uid, f.transfer_syntax) > 128:
            batches.append((_contexts_for(current), current))
            current, count = [], ContextCount()
        current.append(f)
        count.add(f.sop_class_uid, f.transfer_syntax)
    if current:
        batches.append((_contexts_for(current), current))
    return batches


async def _store(args: argparse.Namespace) -> int:
    paths, errors = _collect(args.paths)
    explicit = {Path(p) for p in args.paths if Path(p).is_file()}
    infos: list[Part10File] = []
    skipped = 0

    def inspect() -> None:
        nonlocal skipped
        for path in paths:
            try:
                infos.append(Part10File.open(path))
            except Exception as exc:
                if path in explicit:
                    errors.append(f"{path}: {exc}")
                else:
                    skipped += 1
                    log.info("skipping %s: %s", path, exc)

    await anyio.to_thread.run_sync(inspect)
    tally = _StoreTally(
        total=len(infos),
        total_bytes=sum(i.dataset_length for i in infos),
        show=sys.stderr.isatty() and not args.no_progress,
    )
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    tally.failed += len(errors)
    tally.total += len(errors)

    async def worker(contexts: list[PresentationContext], queue: list[Part10File]) -> None:
        attempts = 0
        while queue:
            try:
                async with _connect(args, contexts) as association:
                    while queue and not association.is_closed:
                        item = queue.pop()
                        try:
                            status = await association.store(item.path)
                        except DicomNetError as exc:
                            tally.failed += 1
                            tally.failures.append(f"{item.path}: {exc}")
                        else:
                            attempts = 0
                            if status.is_warning:
                                tally.warning += 1
                            else:
                                tally.sent += 1
                        tally.bytes_done += item.dataset_length
                        tally.draw()
            except DicomNetError as exc:
                tally.failures.append(f"association: {exc}")
            attempts += 1
            if attempts >= 3 and queue:
                # The peer keeps refusing or dropping us: the rest of this queue fails.
                while queue:
                    item = queue.pop()
                    tally.failed += 1
                    tally.failures.append(f"{item.path}: not sent")
                return

    for contexts, batch in _batches(infos):
        queue = list(reversed(batch))
        async with anyio.create_task_group() as tg:
            for _ in range(max(1, min(args.concurrency, len(batch)))):
                tg.start_soon(worker, contexts, queue)
    tally.draw(force=True)
    if tally.show:
        sys.stderr.write("\n")
    elapsed = max(time.perf_counter() - tally.started, 1e-9)
    for failure in tally.failures:
        print(f"failed: {failure}", file=sys.stderr)
    mb = tally.bytes_done / 1e6
    extra = f", skipped {skipped} non-DICOM" if skipped else ""
    print(
        f"sent {tally.sent}, warning {tally.warning}, failed {tally.failed}{extra}; "
        f"{mb:.1f} MB in {elapsed:.2f} s, {mb / elapsed:.1f} MB/s"
    )
    return 1 if tally.failed else 0


# --- find / move / get ----------------------------------------------------------------------


def _tag(text: str) -> int:
    """A keyword or `gggg,eeee` (parentheses optional) as a tag."""
    from pydicom.datadict import tag_for_keyword

    raw = text.strip().strip("()")
    if "," in raw:
        group, element = raw.split(",", 1)
        try:
            return (int(group, 16) << 16) | int(element, 16)
        except ValueError:
            raise SystemExit(f"dicomnet: {text!r} is not a tag (gggg,eeee)") from None
    tag = tag_for_keyword(raw)
    if tag is None:
        raise SystemExit(f"dicomnet: {text!r} is not a DICOM keyword")
    return int(tag)


def _set_key(dataset: Any, path: str, value: str | None) -> None:
    from pydicom.datadict import dictionary_VR
    from pydicom.dataset import Dataset

    head, _, rest = path.partition(".")
    index = None
    if head.endswith("]") and "[" in head:
        head, _, number = head[:-1].partition("[")
        index = int(number)
    tag = _tag(head)
    if rest or index is not None:
        if tag not in dataset:
            dataset.add_new(tag, "SQ", [])
        items = dataset[tag].value
        position = index or 0
        while len(items) <= position:
            items.append(Dataset())
        if rest:
            _set_key(items[position], rest, value)
        return
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        vr = "LO"
    if vr == "SQ":
        dataset.add_new(tag, vr, [])
    else:
        dataset.add_new(tag, vr, value or None)


def _build_query(keys: Sequence[str]) -> Any:
    from pydicom.dataset import Dataset

    query = Dataset()
    for key in keys:
        name, has_value, value = key.partition("=")
        _set_key(query, name, value if has_value else None)
    return query


_TOP_LEVEL = {"patient": "PATIENT", "study": "STUDY"}


def _level(args: argparse.Namespace) -> str | None:
    if args.level:
        return str(args.level)
    return _TOP_LEVEL.get(args.model)


def _describe(dataset: Any) -> str:
    parts = []
    for element in dataset:
        if element.VR == "SQ":
            parts.append(f"{element.keyword or element.tag}=[{len(element.value)} item(s)]")
        else:
            parts.append(f"{element.keyword or element.tag}={element.value}")
    return "  ".join(parts)


def _qr_contexts(kind: str, model: str) -> list[PresentationContext]:
    from dicomnet.services.qr import FIND_MODELS, GET_MODELS, MOVE_MODELS

    table = {"find": FIND_MODELS, "move": MOVE_MODELS, "get": GET_MODELS}[kind]
    return [PresentationContext(table[model])]


async def _find(args: argparse.Namespace) -> int:
    query = _build_query(args.key)
    count = 0
    async with _connect(args, _qr_contexts("find", args.model)) as association:
        responses = association.find(query, model=args.model, level=_level(args))
        try:
            async for identifier in responses:
                count += 1
                if args.json:
                    print(identifier.to_json(), flush=False)
                else:
                    print(_describe(identifier))
        except DimseError as exc:
            print(f"dicomnet find: {exc} (after {count} match(es))", file=sys.stderr)
            return 1
    status = responses.status
    print(f"{count} match(es); final status {status!r}", file=sys.stderr)
    return 0 if status is not None and not status.is_failure else 1


def _print_progress(progress: Any) -> None:
    label = "final" if progress.is_final else "pending"
    print(
        f"{label}: remaining {progress.remaining}, completed {progress.completed}, "
        f"failed {progress.failed}, warning {progress.warning} ({progress.status!r})"
    )
    for uid in progress.failed_sop_instance_uids:
        print(f"failed: {uid}")


async def _move(args: argparse.Namespace) -> int:
    query = _build_query(args.key)
    async with _connect(args, _qr_contexts("move", args.model)) as association:
        responses = association.move(
            query, destination=args.dest, model=args.model, level=_level(args)
        )
        try:
            async for progress in responses:
                _print_progress(progress)
        except DimseError as exc:
            # A failure final status: show its counts, then release normally.
            progress = getattr(exc, "progress", None)
            if progress is not None:
                _print_progress(progress)
            print(f"dicomnet move: {exc}", file=sys.stderr)
            return 1
    final = responses.progress
    if final is None or responses.status is None:
        return 1
    return 0 if responses.status.is_success and not final.failed else 1


def get_contexts(model: str) -> list[PresentationContext]:
    """The C-GET model plus storage contexts asking for the SCP role (PS3.7 §D.3.3.4)."""
    from dicomnet.proto.contexts import COMMON_STORAGE_SOP_CLASSES, all_storage_sop_classes
    from dicomnet.services.qr import GET_MODELS

    receivable = (
        *UNCOMPRESSED_TRANSFER_SYNTAXES,
        "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
        "1.2.840.10008.1.2.4.50",  # JPEG Baseline
        "1.2.840.10008.1.2.4.51",  # JPEG Extended
        "1.2.840.10008.1.2.4.57",  # JPEG Lossless
        "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
        "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
        "1.2.840.10008.1.2.5",  # RLE Lossless
    )
    classes = list(dict.fromkeys((*COMMON_STORAGE_SOP_CLASSES, *all_storage_sop_classes())))
    contexts = [PresentationContext(GET_MODELS[model])]
    contexts += [
        PresentationContext(uid, receivable, scu_role=False, scp_role=True) for uid in classes[:127]
    ]
    return contexts


async def _get(args: argparse.Namespace) -> int:
    from dicomnet.server import retrieve_listener
    from dicomnet.services.qr import MOVE_MODELS
    from dicomnet.storage import is_valid_uid

    query = _build_query(args.key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    saved = 0

    async def receive(association: Any, listener: Any) -> Any:
        nonlocal saved
        responses = association.retrieve(
            query, model=args.model, level=_level(args), via=args.via, listener=listener
        )
        try:
            async for instance in responses:
                if not is_valid_uid(instance.sop_instance_uid):
                    instance.status = 0xC000
                    continue
                await instance.save(out / f"{instance.sop_instance_uid}.dcm", fsync=False)
                saved += 1
        except DimseError as exc:
            print(f"dicomnet get: {exc}", file=sys.stderr)
        return responses

    if args.via == "move":
        contexts = [PresentationContext(MOVE_MODELS[args.model])]
        async with retrieve_listener(args.aet, args.listen_host, args.listen_port) as listener:
            async with _connect(args, contexts) as association:
                responses = await receive(association, listener)
    else:
        contexts = get_contexts(args.model)
        async with _connect(args, contexts) as association:
            responses = await receive(association, None)
    final = responses.progress
    print(
        f"received {saved} instance(s) into {out}; "
        f"completed {final.completed if final else 0}, failed {final.failed if final else 0}, "
        f"warning {final.warning if final else 0}; final status {responses.status!r}",
        file=sys.stderr,
    )
    if responses.status is None or responses.status.is_failure:
        return 1
    return 0 if not (final and final.failed) else 1


# --- serve -----------------------------------------------------------------------------------


def _parse_peers(raw: Sequence[str]) -> dict[str, tuple[str, int]]:
    peers: dict[str, tuple[str, int]] = {}
    for item in raw:
        try:
            aet, address = item.split("=", 1)
            host, port = address.rsplit(":", 1)
            peers[aet.strip()] = (host, int(port))
        except ValueError:
            raise SystemExit(f"dicomnet serve: --peer {item!r} is not AET=HOST:PORT") from None
    return peers


def _worker_argv(argv: Sequence[str], slot: int) -> list[str]:
    """The command line of a worker process: the same `serve`, as worker `slot`."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--workers":
            skip = True
            continue
        if item.startswith("--workers=") or item == "--reindex":
            continue
        out.append(item)
    parent = ["--worker-of", str(os.getpid()), "--worker-slot", str(slot)]
    return [sys.executable, "-m", "dicomnet", *out, *parent]


async def _serve(args: argparse.Namespace) -> int:
    from dicomnet.pacs.scp import StorageSCP

    workers = max(1, args.workers)
    is_worker = args.worker_of is not None
    if workers > 1 and args.port == 0:
        print("dicomnet serve: --workers needs a fixed --port", file=sys.stderr)
        return 2
    scp = StorageSCP(
        Path(args.storage),
        ae_title=args.aet,
        peers=_parse_peers(args.peer),
        allowed_calling_ae_titles=args.allow,
        max_associations=args.max_associations,
        fsync=args.fsync,
        idle_timeout=args.idle_timeout,
        reindex=args.reindex and not is_worker,
        clean_spool=not is_worker,
        processes=workers,
        process_slot=args.worker_slot if is_worker else 0,
    )
    reuse_port = workers > 1 or is_worker
    children: list[subprocess.Popen[bytes]] = []
    stop = anyio.Event()

    async def on_signals(signals: AsyncIterator[signal.Signals]) -> None:
        # Handled until `serve` returns: a signal during the shutdown (a second Ctrl-C, a
        # worker's SIGTERM from both its process group and the first process) must not
        # kill it while the indexer takes the last batch.
        async for signum in signals:
            how = "already shutting down" if stop.is_set() else "shutting down"
            log.info("received signal %d: %s", signum, how)
            stop.set()

    async def stop_with_parent(parent: int) -> None:
        # A worker ends when the process that started it is gone.
        while os.getppid() == parent:
            await anyio.sleep(1.0)
        stop.set()

    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as watch:
            watch.start_soon(on_signals, signals)
            if is_worker:
                watch.start_soon(stop_with_parent, args.worker_of)
            async with scp.serve(args.host, args.port, reuse_port=reuse_port) as server:
                if not is_worker:
                    for slot in range(1, workers):
                        children.append(subprocess.Popen(_worker_argv(args.argv, slot)))
                    print(
                        f"dicomnet {__version__}: {args.aet} listening on "
                        f"{server.host}:{server.port}"
                        f"{f' with {workers} processes' if workers > 1 else ''}, "
                        f"storing to {scp.storage.resolve()}",
                        flush=True,
                    )
                await stop.wait()  # leaving the block closes the server, then the indexer
            for child in children:
                child.terminate()
            for child in children:
                try:
                    await anyio.to_thread.run_sync(child.wait, 10)
                except subprocess.TimeoutExpired:
                    child.kill()
            watch.cancel_scope.cancel()
    scp.close()
    return 0


async def _bench(args: argparse.Namespace) -> int:
    from dicomnet.cli import bench

    return await bench.run(args)


async def _index(args: argparse.Namespace) -> int:
    from dicomnet.pacs.index import INDEX_FILE_NAME, Index

    storage = Path(args.storage)
    if not storage.is_dir():
        print(f"dicomnet index: {storage} is not a folder", file=sys.stderr)
        return 2

    def rebuild() -> int:
        with Index(storage / INDEX_FILE_NAME, root=storage) as index:
            return index.rebuild(storage)

    count = await anyio.to_thread.run_sync(rebuild)
    print(f"indexed {count} instance(s) in {storage}")
    return 0


def _backend_options() -> dict[str, Any]:
    """uvloop when it is installed (`pip install dicomnet[speed]`) and not turned off with
    DICOMNET_LOOP=asyncio."""
    if os.environ.get("DICOMNET_LOOP", "").lower() == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _raise_open_file_limit() -> None:
    """Thousands of associations need thousands of sockets: lift the soft limit on open
    files to the hard one (as far as 65536)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # pragma: no cover
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    _configure_logging(args)
    if args.command in ("serve", "bench", "store"):
        _raise_open_file_limit()
    runners = {
        "echo": _echo,
        "store": _store,
        "find": _find,
        "move": _move,
        "get": _get,
        "serve": _serve,
        "index": _index,
        "bench": _bench,
    }
    try:
        return anyio.run(runners[args.command], args, backend_options=_backend_options())
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except DicomNetError as exc:
        print(f"dicomnet {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
