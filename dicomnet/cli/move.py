"""`dicomnet move`: C-MOVE to an AE (PS3.4 §C.4.2)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from dicomnet.cli.common import (
    add_common,
    add_query,
    add_remote,
    build_query,
    open_association,
    qr_contexts,
    query_level,
)
from dicomnet.cli.progress import ProgressBar, failure_reason, track
from dicomnet.errors import DimseError

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")


def add_parser(sub: Any) -> None:
    move = sub.add_parser("move", help="C-MOVE: have a peer send instances to an AE")
    add_remote(move)
    add_common(move)
    add_query(move, models=("patient", "study"))
    move.add_argument("--dest", required=True, metavar="AET", help="the move destination")
    move.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    move.set_defaults(run=run)


def _print_progress(progress: Any, every: bool = False, bar: ProgressBar | None = None) -> None:
    """A pending response: the progress bar on a terminal (`bar`), nothing otherwise
    (`every`: a line each, with -v); the final one: its counts, and each failed instance
    with why where the response says, on standard output."""
    counts = (
        f"remaining {progress.remaining}, completed {progress.completed}, "
        f"failed {progress.failed}, warning {progress.warning}"
    )
    if bar is not None:
        track(bar, progress)
    if not progress.is_final:
        if every:
            print(f"pending: {counts} ({progress.status!r})")
        elif bar is not None:
            bar.draw()
        return
    if bar is not None:
        bar.finish()
    print(f"final: {counts} ({progress.status!r})")
    reason = failure_reason(progress)
    for uid in progress.failed_sop_instance_uids:
        print(f"failed: {uid}: {reason}" if reason else f"failed: {uid}")


async def run(args: argparse.Namespace) -> int:
    query = build_query(args.key)
    every = bool(args.verbose or args.debug)
    bar = ProgressBar(
        show=sys.stderr.isatty() and not every and not args.no_progress,
        unit="instances",
        bytes_known=False,  # the instances go from the peer to --dest, not through here
    )
    try:
        async with open_association(args, qr_contexts("move", args.model)) as association:
            responses = association.move(
                query, destination=args.dest, model=args.model, level=query_level(args)
            )
            try:
                async for progress in responses:
                    _print_progress(progress, every, bar)
            except DimseError as exc:
                # A failure final status: show its counts, then release normally.
                progress = getattr(exc, "progress", None)
                if progress is not None:
                    _print_progress(progress, bar=bar)
                bar.abandon()
                print(f"dicomnet move: {exc}", file=sys.stderr)
                return 1
    except BaseException:
        bar.abandon()  # the error gets a line of its own
        raise
    final = responses.progress
    if final is None or responses.status is None:
        return 1
    return 0 if responses.status.is_success and not final.failed else 1
