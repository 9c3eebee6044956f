"""The user guide (docs/, built with mkdocs) cannot drift from the command line: every
option of every command appears in docs/commands.md, every command has its section, and
the option tables are the ones `python docs/gen_cli.py` writes from the parsers."""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dicomnet.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
COMMANDS_MD = DOCS / "commands.md"
COMMON_SECTION = "Options every client command shares"
# The commands the design's command-line contract names; those the command line has
# must each have a section (the others are not implemented yet).
DESIGN_COMMANDS = ("echo", "store", "find", "move", "get", "serve", "bench", "commit", "route")


def subcommands() -> dict[str, argparse.ArgumentParser]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the command line has no subcommands")


def sections() -> dict[str, str]:
    """`## title` -> the text up to the next `## ` heading."""
    text = COMMANDS_MD.read_text(encoding="utf-8")
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {title.strip(): body for title, body in zip(parts[1::2], parts[2::2], strict=True)}


def flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        flag
        for action in parser._actions
        if not isinstance(action, argparse._HelpAction) and action.help != argparse.SUPPRESS
        for flag in action.option_strings
    ]


def mentions(text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text) is not None


def test_every_command_has_a_section() -> None:
    documented = sections()
    missing = [name for name in subcommands() if name not in documented]
    assert not missing, f"docs/commands.md has no '## NAME' section for {missing}"


def test_every_design_command_in_the_cli_has_a_section() -> None:
    documented, commands = sections(), subcommands()
    missing = [n for n in DESIGN_COMMANDS if n in commands and n not in documented]
    assert not missing, f"docs/commands.md has no section for {missing}"


def test_every_option_of_every_command_is_documented() -> None:
    documented = sections()
    common = documented[COMMON_SECTION]
    missing = []
    for name, parser in subcommands().items():
        own = documented.get(name, "")
        for flag in flags(parser):
            if not (mentions(own, flag) or mentions(common, flag)):
                missing.append(f"dicomnet {name} {flag}")
    assert not missing, (
        "options missing from docs/commands.md (run python docs/gen_cli.py, then describe "
        f"them): {missing}"
    )


def test_option_tables_are_current() -> None:
    result = subprocess.run(
        [sys.executable, str(DOCS / "gen_cli.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_every_page_is_in_the_nav() -> None:
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    assert re.search(r"^strict: true", config, flags=re.M)
    for page in DOCS.glob("*.md"):
        assert f": {page.name}" in config, f"{page.name} is not in mkdocs.yml's nav"


@pytest.mark.timeout(120)
def test_the_guide_builds_without_warnings(tmp_path: Path) -> None:
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=110,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "commands" / "index.html").exists()
