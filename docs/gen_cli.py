"""Write the option tables of docs/commands.md from the command line's own parsers.

Each table sits between `<!-- gen_cli: NAME -->` and `<!-- /gen_cli -->`, NAME a
command or `common` (the options every network client command shares, listed once).
Everything outside the markers is written by hand and left as it is.

Run from the repository root: python docs/gen_cli.py  (--check: exit 1 if out of date)
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from dicomnet.cli import build_parser

COMMANDS_MD = Path(__file__).resolve().parent / "commands.md"
# The network client commands: they share the `common` options.
CLIENTS = ("echo", "store", "find", "move", "get", "commit", "bench")
SECTION = re.compile(r"(<!-- gen_cli: ([\w-]+) -->\n)(.*?)(<!-- /gen_cli -->)", re.S)


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise RuntimeError("no subcommands")


def options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The documented actions: positionals and options, not --help or hidden ones."""
    return [
        action
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS
    ]


def key(action: argparse.Action) -> tuple[tuple[str, ...], str | None]:
    return tuple(action.option_strings), action.help


def common_keys(parsers: dict[str, argparse.ArgumentParser]) -> set[tuple[tuple[str, ...], str]]:
    """Options (flags and help alike) that every client command has."""
    sets = [{key(a) for a in options(parsers[name]) if a.option_strings} for name in CLIENTS]
    return set.intersection(*sets)  # type: ignore[arg-type]


def value(action: argparse.Action) -> str:
    if action.nargs == 0:
        return ""
    if action.choices is not None and action.metavar is None:
        return ", ".join(str(c) for c in action.choices)
    metavar = action.metavar or (action.dest.upper() if action.option_strings else action.dest)
    text = str(metavar)
    if action.nargs in ("+", "*"):
        text += " ..."
    return text


def default_text(action: argparse.Action) -> str:
    """The default of an option that takes a value, as the command line would write it."""
    default = action.default
    if not action.option_strings or action.nargs == 0 or default in (None, [], argparse.SUPPRESS):
        return ""
    if isinstance(default, float) and default.is_integer():
        return str(int(default))
    return str(default)


def cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def table(actions: list[argparse.Action]) -> str:
    rows = ["| option | value | what it does |", "|---|---|---|"]
    for action in actions:
        if action.option_strings:
            names = ", ".join(f"`{flag}`" for flag in action.option_strings)
        else:
            many = " ..." if action.nargs in ("+", "*") else ""
            names = f"`{action.metavar or action.dest}{many}` (positional)"
        what = cell(action.help or "")
        default = default_text(action)
        if default and default not in what and "default" not in what.lower():
            what += f" (default: {default})"
        if action.required and action.option_strings:
            what += " (required)"
        if isinstance(action, argparse._AppendAction):
            what += " (repeatable)" if "repeatable" not in what else ""
        shown = value(action) if action.option_strings else ""
        rows.append(f"| {names} | {f'`{cell(shown)}`' if shown else ''} | {what} |")
    return "\n".join(rows) + "\n"


def tables() -> dict[str, str]:
    parsers = subcommands()
    common = common_keys(parsers)
    out = {"common": table([a for a in options(parsers["echo"]) if key(a) in common])}
    for name, parser in parsers.items():
        shared = common if name in CLIENTS else set()
        out[name] = table([a for a in options(parser) if key(a) not in shared])
    return out


def render(text: str) -> str:
    generated = tables()

    def replace(match: re.Match[str]) -> str:
        name = match.group(2)
        if name not in generated:
            raise SystemExit(f"docs/commands.md: no command {name!r} for a gen_cli table")
        return match.group(1) + "\n" + generated[name] + "\n" + match.group(4)

    return SECTION.sub(replace, text)


def main() -> int:
    text = COMMANDS_MD.read_text(encoding="utf-8")
    new = render(text)
    if "--check" in sys.argv[1:]:
        if new != text:
            print("docs/commands.md is out of date: run python docs/gen_cli.py", file=sys.stderr)
            return 1
        return 0
    COMMANDS_MD.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
