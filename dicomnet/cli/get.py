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
from dicomnet.cli.progress import ProgressBar, failure_reason, track
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
    get.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
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
    saved = 0
    # Instances that arrived but could not be written: SOP Instance UID -> why.
    not_saved: dict[str, str] = {}
    bar = ProgressBar(show=sys.stderr.isatty() and not args.no_progress, unit="instances")
    error: DimseError | None = None

    async def receive(association: Any, listener: Any) -> Any:
        nonlocal saved, error
        responses = association.retrieve(
            query, model=args.model, level=query_level(args), via=args.via, listener=listener
        )
        try:
            async for instance in responses:
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
                    saved += 1
                    bar.bytes_done += instance.size
                _track(bar, responses.progress, saved, len(not_saved))
                bar.draw()
        except DimseError as exc:
            error = exc
        return responses

    try:
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
    except BaseException:
        bar.abandon()  # the error gets a line of its own
        raise
    final = responses.progress
    _track(bar, final, saved, len(not_saved))
    bar.finish()
    if error is not None:
        print(f"dicomnet get: {error}", file=sys.stderr)
    mb = bar.bytes_done / 1e6
    print(
        f"received {saved} instance(s) into {out}; "
        f"completed {final.completed if final else 0}, failed {final.failed if final else 0}, "
        f"warning {final.warning if final else 0}; final status {responses.status!r}; "
        f"{mb:.1f} MB in {bar.elapsed:.2f} s, {bar.megabytes_per_second:.1f} MB/s",
        file=sys.stderr,
    )
    failed = dict(not_saved)
    if final is not None:
        reason = failure_reason(final)
        for uid in final.failed_sop_instance_uids:
            failed.setdefault(uid, reason)
    for uid, why in failed.items():
        print(f"failed: {uid}: {why}" if why else f"failed: {uid}", file=sys.stderr)
    if responses.status is None or responses.status.is_failure or not_saved:
        return 1
    return 0 if not (final and final.failed) else 1
