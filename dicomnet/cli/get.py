"""`dicomnet get`: C-GET (or C-MOVE to a listener of ours) into a folder."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from dicomnet.cli.common import (
    add_common,
    add_query,
    add_remote,
    build_query,
    open_association,
    query_level,
    tls_listener_context,
)
from dicomnet.errors import DimseError
from dicomnet.proto.contexts import PresentationContext

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
    saved = 0

    async def receive(association: Any, listener: Any) -> Any:
        nonlocal saved
        responses = association.retrieve(
            query, model=args.model, level=query_level(args), via=args.via, listener=listener
        )
        try:
            async for instance in responses:
                # Into `out` under a name that cannot lead out of it (`safe_file_name`).
                await instance.save(out, fsync=False)
                saved += 1
        except DimseError as exc:
            print(f"dicomnet get: {exc}", file=sys.stderr)
        return responses

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
