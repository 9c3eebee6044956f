"""`dicomnet echo`: C-ECHO a peer (PS3.7 §9.1.5)."""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

from dicomnet.cli.common import (
    add_common,
    add_remote,
    open_association,
)
from dicomnet.errors import DimseError
from dicomnet.proto.contexts import (
    PresentationContext,
)

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")


def add_parser(sub: Any) -> None:
    echo = sub.add_parser("echo", help="C-ECHO a peer; exit 0 only if every echo succeeded")
    add_remote(echo)
    add_common(echo)
    echo.add_argument("--count", type=int, default=1, help="number of C-ECHOs (default 1)")
    echo.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    from dicomnet.proto.contexts import VERIFICATION

    failures = 0
    async with open_association(args, [PresentationContext(VERIFICATION)]) as association:
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
