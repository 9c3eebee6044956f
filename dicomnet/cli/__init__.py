"""The `dicomnet` command line: one module per command, each with `add_parser(sub)`
(its options, and `run(args)` as the default to call)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import anyio

from dicomnet._version import __version__
from dicomnet.cli import (
    bench,
    commit,
    delete,
    echo,
    find,
    get,
    index,
    move,
    passwd,
    route,
    serve,
    store,
)
from dicomnet.cli.common import (
    Parser,
    UsageError,
    configure_logging,
    prepare_tls,
    query_level,
)
from dicomnet.errors import DicomNetError

__all__ = ["build_parser", "main"]

COMMANDS = (echo, store, find, move, get, serve, route, bench, index, delete, commit, passwd)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="dicomnet", description="DICOM networking: verification, storage and serving."
    )
    parser.add_argument("--version", action="version", version=f"dicomnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _backend_options() -> dict[str, Any]:
    """uvloop when it is installed (`pip install dicomnet[speed]`) and not turned off with
    DICOMNET_LOOP=asyncio."""
    if os.environ.get("DICOMNET_LOOP", "").lower() == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _raise_open_file_limit() -> None:
    """Thousands of associations need thousands of sockets: lift the soft limit on open
    files to the hard one (as far as 65536)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):  # pragma: no cover
            pass


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    configure_logging(args)
    prepare_tls(args)
    if args.command in ("serve", "route", "bench", "store"):
        _raise_open_file_limit()
    try:
        if hasattr(args, "level") and hasattr(args, "model"):
            query_level(args)  # a level the model lacks: said before connecting
        status: int = anyio.run(args.run, args, backend_options=_backend_options())
        return status
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # Output piped into e.g. `head`, which stopped reading: not an error of ours.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except UsageError as exc:
        print(f"dicomnet {args.command}: {exc}", file=sys.stderr)
        return 2
    except DicomNetError as exc:
        print(f"dicomnet {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        if args.debug:
            raise
        print(
            f"dicomnet {args.command}: {type(exc).__name__}: {exc} (--debug shows where)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
