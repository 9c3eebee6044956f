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
    get.set_defaults(run=run)


def get_contexts(model: str) -> list[PresentationContext]:
    """The C-GET model plus storage contexts asking for the SCP role (PS3.7 §D.3.3.4)."""
    from dicomnet.client import retrieve_contexts

    return retrieve_contexts(model)


async def run(args: argparse.Namespace) -> int:
    from dicomnet.server import retrieve_listener
    from dicomnet.services.qr import MOVE_MODELS

    query = build_query(args.key)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    received: set[str] = set()

    async def receive(association: Any, listener: Any, again: bool = False) -> Any:
        responses = association.retrieve(
            query, model=args.model, level=query_level(args), via=args.via, listener=listener
        )
        try:
            async for instance in responses:
                if instance.sop_instance_uid in received:
                    continue  # sent again in a later round: the first copy stays
                # Into `out` under a name that cannot lead out of it (`safe_file_name`).
                await instance.save(out, fsync=False)
                received.add(instance.sop_instance_uid)
        except DimseError as exc:
            if again:  # the instances not sent this time are counted from the first
                log.info("C-GET again: %s", exc)
            else:
                print(f"dicomnet get: {exc}", file=sys.stderr)
        return responses

    again: set[str] = set()
    if args.via == "move":
        contexts = [PresentationContext(MOVE_MODELS[args.model])]
        async with retrieve_listener(
            args.aet, args.listen_host, args.listen_port, tls=tls_listener_context(args)
        ) as listener:
            async with open_association(args, contexts) as association:
                responses = await receive(association, listener)
    else:
        contexts = get_contexts(args.model)
        async with open_association(args, contexts) as association:
            responses = await receive(association, None)
            converts = association.peer_implementation_class_uid == IMPLEMENTATION_CLASS_UID
        final = responses.progress
        if final is not None and final.failed_sop_instance_uids and not converts:
            missing = set(final.failed_sop_instance_uids) - received
            again = missing - await _again_by_syntax(args, receive, missing, received)
    final = responses.progress
    failed = (final.failed or 0) - len(again) if final else 0
    completed = (final.completed or 0) + len(again) if final else 0
    status = responses.status if failed or not again else Status(0x0000)
    print(
        f"received {len(received)} instance(s) into {out}; "
        f"completed {completed}, failed {failed}, "
        f"warning {final.warning if final else 0}; final status {status!r}",
        file=sys.stderr,
    )
    if status is None or status.is_failure:
        return 1
    return 0 if not failed else 1


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
