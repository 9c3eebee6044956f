"""`dicomnet commit`: storage commitment of the instances in files (PS3.4 Annex J).

The N-ACTION goes on an association to the peer; the report is awaited there, or, with
`--listen-port`, also on an association the peer opens to us (the peer must know our
`--aet` at that address). Exit status 0 only if every instance was committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import anyio

from dicomnet.cli.common import (
    UsageError,
    add_common,
    add_remote,
    open_association,
    tls_listener_context,
)
from dicomnet.errors import DicomNetError
from dicomnet.proto.contexts import STORAGE_COMMITMENT_PUSH, PresentationContext
from dicomnet.services.commitment import CommitmentResult, instance_references

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    commit = sub.add_parser(
        "commit", help="storage commitment: ask a peer to commit the instances in files"
    )
    add_remote(commit, timeout_flag="--connect-timeout")
    add_common(commit)
    commit.add_argument("paths", nargs="+", metavar="PATH", help="files or folders")
    commit.add_argument(
        "--listen-port",
        type=int,
        default=None,
        metavar="P",
        help="also receive the report on an association the peer opens to us on port P "
        "(over TLS with --tls-cert/--tls-key, and only from peers with a --tls-ca "
        "certificate when that is given)",
    )
    commit.add_argument(
        "--listen-host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)"
    )
    commit.add_argument(
        "--timeout",
        dest="report_timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="wait at most S seconds for the report (default 600)",
    )
    commit.set_defaults(run=run)


def _files(paths: list[str]) -> list[Path]:
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise UsageError(f"{raw}: no such file or folder")
    return files


def _references(files: list[Path]) -> list[tuple[str, str]]:
    references = []
    for path in files:
        try:
            references += instance_references([path])
        except (OSError, ValueError) as exc:
            print(f"skipping {path}: {exc}", file=sys.stderr)
    return references


def _print(result: CommitmentResult) -> None:
    for sop_class, sop_instance in result.committed:
        print(f"committed {sop_instance} ({sop_class})")
    for sop_class, sop_instance, reason in result.failed:
        print(f"failed {sop_instance} ({sop_class}): failure reason 0x{reason:04X}")
    print(
        f"transaction {result.transaction_uid}: {len(result.committed)} committed, "
        f"{len(result.failed)} failed",
        file=sys.stderr,
    )


async def run(args: argparse.Namespace) -> int:
    from dicomnet.server import commitment_listener

    references = await anyio.to_thread.run_sync(_references, _files(args.paths))
    if not references:
        print("dicomnet commit: no DICOM instances to commit", file=sys.stderr)
        return 2
    contexts = [PresentationContext(STORAGE_COMMITMENT_PUSH)]
    try:
        if args.listen_port is None:
            async with open_association(args, contexts) as association:
                result = await association.request_commitment(
                    references, timeout=args.report_timeout
                )
        else:
            async with commitment_listener(
                args.aet, args.listen_host, args.listen_port, tls=tls_listener_context(args)
            ) as ear:
                async with open_association(args, contexts) as association:
                    result = await association.request_commitment(
                        references, listener=ear, timeout=args.report_timeout
                    )
    except DicomNetError as exc:
        print(f"dicomnet commit: {exc}", file=sys.stderr)
        return 1
    _print(result)
    return 0 if result.all_committed else 1
