"""`dicomnet serve`: the embedded PACS (`dicomnet.pacs`) on one or more processes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

import anyio
import anyio.to_thread

from dicomnet._version import __version__
from dicomnet.cli.common import (
    TLS_PEER,
    UsageError,
    add_common,
    add_tls,
)
from dicomnet.cli.exporter import add_metrics_flags, metrics_observer, start_metrics

if TYPE_CHECKING:
    from dicomnet.pacs.scp import StorageSCP

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")


def add_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve", help="run a storage and query/retrieve SCP over what it receives"
    )
    add_common(serve)
    # None: not given; the title is then DICOMNET and any called AE title is answered.
    serve.set_defaults(aet=None)
    serve.add_argument(
        "--any-called-ae",
        action="store_true",
        help="answer associations whatever AE title they call (the default when --aet is "
        "not given); with --aet, a peer calling another title is rejected (PS3.8 "
        "Table 9-21: called AE title not recognized)",
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1)")
    serve.add_argument("--port", type=int, default=11112, help="TCP port (default 11112)")
    serve.add_argument(
        "--storage", default="./dicomnet-storage", help="folder for received instances"
    )
    serve.add_argument(
        "--index",
        metavar="URL",
        help="keep the query/retrieve index in PostgreSQL (postgresql://user@host/db; "
        "needs dicomnet[postgresql]) instead of the SQLite file in --storage",
    )
    serve.add_argument(
        "--node",
        metavar="NAME",
        help="with --index: this node's name among those sharing the storage folder "
        "(default HOST-PORT); a stable one where host names change, as in containers",
    )
    serve.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="AET=HOST:PORT",
        help="a known peer (move destination, storage commitment requestor), repeatable; "
        "AET=tls://HOST:PORT: reached over TLS (verified with --tls-ca, presenting "
        "--tls-cert/--tls-key)",
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
        "--max-pdu",
        type=int,
        default=262_144,
        metavar="BYTES",
        help="the largest P-DATA-TF PDU we receive, told to the peer (PS3.8 D.1; default "
        "262144; storescp's --max-pdu; 0: no limit)",
    )
    serve.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="answer C-STORE only once the file and its folder entry are on disk (default); "
        "--no-fsync answers sooner and is less durable",
    )
    serve.add_argument(
        "--reindex", action="store_true", help="rebuild the index from the stored files first"
    )
    serve.add_argument(
        "--worklist",
        type=Path,
        metavar="DIR",
        help="also a Modality Worklist SCP: each file in DIR (DICOM or DICOM JSON) is an item",
    )
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve with N processes on one port (SO_REUSEPORT), to use every core",
    )
    serve.add_argument(
        "--on-duplicate",
        choices=("keep", "replace", "reject"),
        default="keep",
        help="an instance stored already: keep the stored copy (default; success is "
        "answered), replace it, or reject the new one (status 0111); each case is logged",
    )
    _add_security(serve)
    add_metrics_flags(
        serve, "associations, operations by service and status, bytes, latency", per_worker=True
    )
    _add_limits(serve)
    add_tls(serve, server=True)
    serve.add_argument("--worker-of", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument("--worker-slot", type=int, default=0, help=argparse.SUPPRESS)
    serve.set_defaults(run=run)


def _add_limits(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "limits (past any of them an association ends; the server goes on)"
    )
    group.add_argument(
        "--idle-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="abort an association with nothing received or sent for S seconds (60)",
    )
    group.add_argument(
        "--write-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="abort an association whose peer reads nothing we send for S seconds (60)",
    )
    group.add_argument(
        "--message-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="a message must arrive within S seconds plus one second per "
        "--min-receive-rate bytes (60)",
    )
    group.add_argument(
        "--min-receive-rate",
        type=int,
        default=4096,
        metavar="B",
        help="bytes a second a message must arrive at, after --message-timeout (4096)",
    )
    group.add_argument(
        "--max-dataset-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="abort an association sending a data set larger than this (default: no limit)",
    )
    group.add_argument(
        "--max-associations-per-ae",
        type=int,
        default=None,
        metavar="N",
        help="refuse associations past N at once from one calling AE title (2/3/2)",
    )


def _apply_limits(ae: Any, args: argparse.Namespace) -> None:
    """The command line's limits on the AE's associations."""
    ae.settings = dataclasses.replace(
        ae.settings,
        write_timeout=args.write_timeout,
        message_timeout=args.message_timeout,
        min_receive_rate=args.min_receive_rate,
        max_dataset_size=args.max_dataset_size,
        max_pdu_length=args.max_pdu,
    )
    ae.max_associations_per_ae = args.max_associations_per_ae


def _add_security(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group("identity, access control and audit")
    group.add_argument(
        "--users",
        type=Path,
        metavar="FILE",
        help="check user name and password identities against FILE (see dicomnet passwd)",
    )
    group.add_argument(
        "--require-user",
        action="store_true",
        help="reject associations without a verified user identity (1/1/1, PS3.7 D.3.3.7)",
    )
    group.add_argument(
        "--access",
        type=Path,
        metavar="FILE",
        help="services allowed per calling AE title, address and user (TOML [[rule]]s)",
    )
    group.add_argument(
        "--audit",
        type=Path,
        metavar="FILE",
        help="append audit events to FILE, one JSON object a line (PS3.15 A.5 events)",
    )


def _security(args: argparse.Namespace) -> dict[str, Any]:
    """The AE's authenticator, access policy and audit log from the command line."""
    from dicomnet.server import security_settings

    if args.require_user and args.users is None:
        print("dicomnet serve: --require-user needs --users", file=sys.stderr)
        raise SystemExit(2)
    try:
        return security_settings(
            users=args.users, require_user=args.require_user, access=args.access, audit=args.audit
        )
    except (OSError, ValueError) as exc:
        raise SystemExit(f"dicomnet serve: {exc}") from None


def _parse_peers(
    raw: Sequence[str], tls: ssl.SSLContext | None = None
) -> dict[str, tuple[str, int]]:
    """`AET=HOST:PORT`, or `AET=tls://HOST:PORT` for a peer reached over `tls`."""
    from dicomnet.tls import Peer

    peers: dict[str, tuple[str, int]] = {}
    for item in raw:
        try:
            aet, address = item.split("=", 1)
            secure = address.startswith(TLS_PEER)
            host, port = address.removeprefix(TLS_PEER).rsplit(":", 1)
            peers[aet.strip()] = Peer(host, int(port), tls if secure else None)
        except ValueError:
            raise UsageError(
                f"--peer {item!r} is not AET=HOST:PORT or AET=tls://HOST:PORT"
            ) from None
    return peers


def _tls_note(tls: ssl.SSLContext | None, ca: str | None) -> str:
    if tls is None:
        return ""
    return " with TLS (client certificates required)" if ca else " with TLS"


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


def _storage_problem(storage: Path) -> str | None:
    """Why `storage` cannot hold received instances, or None."""
    if storage.exists() and not storage.is_dir():
        return "not a folder"
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot be created: {exc.strerror or exc}"
    if not os.access(storage, os.W_OK | os.X_OK):
        return "not writable by this user"
    return None


def _listen_error(exc: BaseException) -> OSError | None:
    """The OSError of a listener that could not be opened (a port in use, a host not
    ours, a port below 1024 without the right), out of the task groups around it."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, OSError) and exc.errno in _LISTEN_ERRORS:
        return exc
    return None


_LISTEN_ERRORS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}


async def run(args: argparse.Namespace) -> int:
    from dicomnet.pacs.scp import StorageSCP

    check_called = args.aet is not None and not args.any_called_ae
    args.aet = args.aet or "DICOMNET"
    workers = max(1, args.workers)
    is_worker = args.worker_of is not None
    security = _security(args)
    observer = metrics_observer(args, "serve")
    if args.max_pdu != 0 and not 1024 <= args.max_pdu <= 2**31 - 1:
        print("dicomnet serve: --max-pdu is 0 (no limit) or 1024 to 2147483647", file=sys.stderr)
        return 2
    if workers > 1 and args.port == 0:
        print("dicomnet serve: --workers needs a fixed --port", file=sys.stderr)
        return 2
    problem = _storage_problem(Path(args.storage))
    if problem is not None:
        print(f"dicomnet serve: --storage {args.storage}: {problem}", file=sys.stderr)
        return 2
    scp = StorageSCP(
        Path(args.storage),
        ae_title=args.aet,
        peers=_parse_peers(args.peer, getattr(args, "tls_context", None)),
        allowed_calling_ae_titles=args.allow,
        max_associations=args.max_associations,
        fsync=args.fsync,
        idle_timeout=args.idle_timeout,
        reindex=args.reindex and not is_worker,
        clean_spool=not is_worker,
        processes=workers,
        process_slot=args.worker_slot if is_worker else 0,
        worklist=args.worklist,
        on_duplicate=args.on_duplicate,
        index=args.index,
        node=args.node or f"{socket.gethostname()}-{args.port}",
    )
    for name, value in security.items():
        setattr(scp.ae, name, value)
    scp.ae.require_called_ae_title = check_called
    scp.ae.observer = observer
    _apply_limits(scp.ae, args)
    with contextlib.ExitStack() as exporter:  # the metrics are served until serve ends
        metrics = start_metrics(exporter, observer, args, "serve") if observer is not None else ""
        if metrics is None:
            scp.close()
            return 1
        return await _serve(scp, args, security, metrics)


async def _serve(
    scp: StorageSCP, args: argparse.Namespace, security: dict[str, Any], metrics: str
) -> int:
    """Serve until a signal (or, for a worker, until the first process is gone)."""
    workers = max(1, args.workers)
    is_worker = args.worker_of is not None
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

    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as watch:
                watch.start_soon(on_signals, signals)
                if is_worker:
                    watch.start_soon(stop_with_parent, args.worker_of)
                tls = getattr(args, "tls_server_context", None)
                async with scp.serve(
                    args.host, args.port, reuse_port=reuse_port, tls=tls
                ) as server:
                    if not is_worker:
                        for slot in range(1, workers):
                            children.append(subprocess.Popen(_worker_argv(args.argv, slot)))
                        print(
                            f"dicomnet {__version__}: {args.aet} listening on "
                            f"{server.host}:{server.port}"
                            f"{_tls_note(tls, args.tls_ca)}"
                            f"{f' with {workers} processes' if workers > 1 else ''}, "
                            f"storing to {scp.storage.resolve()}",
                            flush=True,
                        )
                        if metrics:
                            more = (
                                f" (process k: port {args.metrics_port}+k)" if workers > 1 else ""
                            )
                            print(f"metrics at {metrics}{more}", flush=True)
                    await stop.wait()  # leaving the block closes the server, then the indexer
                for child in children:
                    child.terminate()
                for child in children:
                    try:
                        await anyio.to_thread.run_sync(child.wait, 10)
                    except subprocess.TimeoutExpired:
                        child.kill()
                watch.cancel_scope.cancel()
    except BaseException as exc:
        error = _listen_error(exc)
        if error is None:
            raise
        scp.close()
        reason = error.strerror or str(error)
        print(
            f"dicomnet serve: cannot listen on {args.host}:{args.port}: {reason} "
            "(another server on that port? choose one with --port)",
            file=sys.stderr,
        )
        return 1
    scp.close()
    if security["audit"] is not None:
        security["audit"].close()
    return 0
