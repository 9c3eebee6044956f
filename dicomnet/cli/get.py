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
from dicomnet.proto.contexts import (
    UNCOMPRESSED_TRANSFER_SYNTAXES,
    PresentationContext,
)

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
