"""`dicomnet get`: C-GET (or C-MOVE to a listener of ours) into a folder."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from dicomnet.cli.common import (
    add_common,
    add_query,
    add_remote,
    build_query,
    open_association,
    query_level,
    tls_listener_context,
)
from dicomnet.cli.progress import ProgressBar, failure_reason, track
from dicomnet.errors import DicomNetError, DimseError
from dicomnet.proto.contexts import RECEIVABLE_TRANSFER_SYNTAXES, PresentationContext
from dicomnet.status import Status
from dicomnet.storage import IMPLEMENTATION_CLASS_UID

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")


def add_parser(sub: Any) -> None:
    get = sub.add_parser("get", help="C-GET: retrieve instances into a folder")
    add_remote(get)
    add_common(get)
    add_query(get, models=("patient", "study"))
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
        "--listen-port",
        type=int,
        default=11113,
        help="listener port (--via move, 11113; over TLS with --tls-cert/--tls-key)",
    )
    get.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    get.set_defaults(run=run)


def get_contexts(model: str) -> list[PresentationContext]:
    """The C-GET model plus storage contexts asking for the SCP role (PS3.7 §D.3.3.4)."""
    from dicomnet.client import retrieve_contexts

    return retrieve_contexts(model)


def _track(bar: ProgressBar, progress: Any, saved: int, unsaved: int) -> None:
    """The bar's counts: the peer's (from its last response), and ours where they are
    ahead (the instance just received is not in the peer's counts yet)."""
    if progress is not None:
        track(bar, progress)
    bar.completed = max(bar.completed, saved)
    bar.failed = max(bar.failed, unsaved)
    bar.total = max(bar.total, bar.done)


async def run(args: argparse.Namespace) -> int:
    from dicomnet.server import retrieve_listener
    from dicomnet.services.qr import MOVE_MODELS

    query = build_query(args.key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    received: set[str] = set()
    # Instances that arrived but could not be written: SOP Instance UID -> why.
    not_saved: dict[str, str] = {}
    bar = ProgressBar(show=sys.stderr.isatty() and not args.no_progress, unit="instances")
    error: DimseError | None = None

    async def receive(association: Any, listener: Any, again: bool = False) -> Any:
        nonlocal error
        responses = association.retrieve(
            query, model=args.model, level=query_level(args), via=args.via, listener=listener
        )
        try:
            async for instance in responses:
                if instance.sop_instance_uid in received:
                    continue  # sent again in a later round: the first copy stays
                try:
                    # Into `out` under a name that cannot lead out of it (`safe_file_name`).
                    await instance.save(out, fsync=False)
                except OSError as exc:
                    # Answered Out of Resources: the peer counts it failed.
                    instance.status = 0xA700
                    why = exc.strerror or str(exc)
                    not_saved[instance.sop_instance_uid] = f"not saved: {why}"
                    log.info("could not save %s: %s", instance.sop_instance_uid, exc)
                else:
                    received.add(instance.sop_instance_uid)
                    bar.bytes_done += instance.size
                if not again:
                    _track(bar, responses.progress, len(received), len(not_saved))
                bar.draw()
        except DimseError as exc:
            if again:  # what a later round does not send is counted from the first
                log.info("C-GET again: %s", exc)
            else:
                error = exc
        return responses

    again: set[str] = set()  # failed at first, received in a later round
    try:
        if args.via == "move":
            contexts = [PresentationContext(MOVE_MODELS[args.model])]
            async with retrieve_listener(
                args.aet, args.listen_host, args.listen_port, tls=tls_listener_context(args)
            ) as listener:
                async with open_association(args, contexts) as association:
                    responses = await receive(association, listener)
        else:
            async with open_association(args, get_contexts(args.model)) as association:
                responses = await receive(association, None)
                converts = association.peer_implementation_class_uid == IMPLEMENTATION_CLASS_UID
            first = responses.progress
            if first is not None and first.failed_sop_instance_uids and not converts:
                missing = set(first.failed_sop_instance_uids) - received
                again = missing - await _again_by_syntax(args, receive, missing, received)
    except BaseException:
        bar.abandon()  # the error gets a line of its own
        raise
    final = responses.progress
    _track(bar, final, len(received), len(not_saved))
    bar.finish()
    if error is not None:
        print(f"dicomnet get: {error}", file=sys.stderr)
    failed_count = (final.failed or 0) - len(again) if final else 0
    completed = (final.completed or 0) + len(again) if final else 0
    status = Status(0x0000) if again and not failed_count else responses.status
    mb = bar.bytes_done / 1e6
    print(
        f"received {len(received)} instance(s) into {out}; "
        f"completed {completed}, failed {failed_count}, "
        f"warning {final.warning if final else 0}; final status {status!r}; "
        f"{mb:.1f} MB in {bar.elapsed:.2f} s, {bar.megabytes_per_second:.1f} MB/s",
        file=sys.stderr,
    )
    failed = dict(not_saved)
    if final is not None:
        reason = failure_reason(final)
        for uid in final.failed_sop_instance_uids:
            if uid not in received:
                failed.setdefault(uid, reason)
    for uid, why in failed.items():
        print(f"failed: {uid}: {why}" if why else f"failed: {uid}", file=sys.stderr)
    if status is None or status.is_failure or not_saved:
        return 1
    return 0 if not failed_count else 1


async def _again_by_syntax(
    args: argparse.Namespace,
    receive: Callable[[Any, Any, bool], Awaitable[Any]],
    missing: set[str],
    received: set[str],
) -> set[str]:
    """C-GET again, offering one compressed syntax at a time, while instances are missing:
    a peer that sends every instance of a class on the first context accepted for it (as
    DCMTK's dcmqrscp does) and cannot convert sends, each time, those stored in the syntax
    offered. Returns what is still missing. Not needed with a dicomnet peer: it converts."""
    from dicomnet.client import retrieve_contexts

    for transfer_syntax in RECEIVABLE_TRANSFER_SYNTAXES:
        missing = missing - received
        if not missing:
            break
        name = UID(transfer_syntax).name
        log.info("%d instance(s) not received: C-GET again offering %s", len(missing), name)
        try:
            async with open_association(args, retrieve_contexts(args.model, transfer_syntax)) as a:
                await receive(a, None, True)
        except DicomNetError as exc:
            log.info("C-GET again offering %s: %s", name, exc)
    return missing - received
