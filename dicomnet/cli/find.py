"""`dicomnet find`: C-FIND (PS3.4 Annex C; the worklist, Annex K)."""

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
    describe,
    open_association,
    qr_contexts,
    query_level,
)
from dicomnet.errors import DimseError

__all__ = ["add_parser", "run"]

log = logging.getLogger("dicomnet")


def add_parser(sub: Any) -> None:
    find = sub.add_parser("find", help="C-FIND: query a peer")
    add_remote(find)
    add_common(find)
    add_query(find)
    find.add_argument("--json", action="store_true", help="one DICOM JSON object a line")
    find.set_defaults(run=run)


async def run(args: argparse.Namespace) -> int:
    query = build_query(args.key)
    count = 0
    async with open_association(args, qr_contexts("find", args.model)) as association:
        responses = association.find(query, model=args.model, level=query_level(args))
        try:
            async for identifier in responses:
                count += 1
                if args.json:
                    print(identifier.to_json(), flush=False)
                else:
                    print(describe(identifier))
        except DimseError as exc:
            print(f"dicomnet find: {exc} (after {count} match(es))", file=sys.stderr)
            return 1
    status = responses.status
    print(f"{count} match(es); final status {status!r}", file=sys.stderr)
    return 0 if status is not None and not status.is_failure else 1
