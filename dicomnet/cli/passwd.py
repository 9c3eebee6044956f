"""`dicomnet passwd NAME [--file USERS]`: a user's salted scrypt password hash, for
`serve --users USERS`.

The password is read from the terminal (asked twice) or, when standard input is not
a terminal, from its first line; never from an option. With `--file` the user's line
is added to the file or replaced in it (created with mode 0600); without, it is printed.
`--check` verifies a password against the file instead (exit 0 if it matches, 1 if not).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

import anyio.to_thread

from dicomnet.identity import check_user_name, hash_password, read_users, verify_hash, write_user

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    parser = sub.add_parser(
        "passwd",
        help="set a user's password for serve --users (salted scrypt hash)",
        description="Hash a user's password for `dicomnet serve --users FILE`. The password "
        "is read from the terminal, or from standard input when it is not a terminal.",
    )
    parser.add_argument("name", help="the user name (as sent in the User Identity item)")
    parser.add_argument(
        "--file",
        type=Path,
        metavar="USERS",
        help="add or update the user's line in this file (created 0600); "
        "without it, the line is printed",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="verify the password against --file instead (exit 0 if it matches, 1 if not)",
    )
    parser.set_defaults(run=run)


def _read_password(confirm: bool) -> str | None:
    if not sys.stdin.isatty():
        line = sys.stdin.readline()
        return line[:-1] if line.endswith("\n") else line
    first = getpass.getpass("Password: ")
    if confirm and getpass.getpass("Again: ") != first:
        print("dicomnet passwd: the passwords differ", file=sys.stderr)
        return None
    return first


async def run(args: argparse.Namespace) -> int:
    try:
        check_user_name(args.name)
    except ValueError as exc:
        print(f"dicomnet passwd: {exc}", file=sys.stderr)
        return 2
    if args.check and args.file is None:
        print("dicomnet passwd: --check needs --file", file=sys.stderr)
        return 2
    password = _read_password(confirm=not args.check)
    if password is None:
        return 1
    if not password:
        print("dicomnet passwd: empty password", file=sys.stderr)
        return 1
    try:
        if args.check:
            hashed = read_users(args.file).get(args.name)
            ok = hashed is not None and await anyio.to_thread.run_sync(
                verify_hash, password, hashed
            )
            print("password matches" if ok else "no match", file=sys.stderr)
            return 0 if ok else 1
        line = await anyio.to_thread.run_sync(hash_password, password)
        if args.file is None:
            print(f"{args.name}:{line}")
        else:
            write_user(args.file, args.name, line)
            print(f"dicomnet passwd: {args.name} set in {args.file}", file=sys.stderr)
    except (OSError, ValueError) as exc:
        print(f"dicomnet passwd: {exc}", file=sys.stderr)
        return 1
    return 0
