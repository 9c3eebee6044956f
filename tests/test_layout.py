"""The layers of the package (DESIGN.md "Package layout"): no import runs back up a
layer, the sans-IO core touches no I/O, time or event loop, and the association shell
knows no service by name."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "dicomnet"

# Each layer, bottom up, and the dicomnet modules it may import (besides its own).
FOUNDATION = {"dicomnet._version", "dicomnet.errors", "dicomnet.status"}
SHELL = {"dicomnet.association", "dicomnet.writer", "dicomnet.stream", "dicomnet.storage"}
SHELL |= {"dicomnet.transport", "dicomnet.invoking", "dicomnet.performing", "dicomnet.receiving"}
ABOVE_SERVICES = {"dicomnet.client", "dicomnet.server", "dicomnet.pacs", "dicomnet.cli"}
ABOVE_SERVICES |= {"dicomnet.testing", "dicomnet.route", "dicomnet.pool"}
NO_IO = {"asyncio", "anyio", "time", "socket", "threading", "selectors", "os", "io"}


def imports(path: Path) -> set[str]:
    """Every module `path` imports (type-checking-only imports included)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(folder: str = "") -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py") if folder else PACKAGE.glob("*.py"))


def starts(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("path", modules("proto"), ids=lambda p: p.name)
def test_the_core_is_sans_io(path: Path) -> None:
    for name in imports(path):
        root = name.split(".")[0]
        assert root not in NO_IO, f"{module_name(path)} imports {name}"
        if root == "dicomnet":
            assert starts(name, FOUNDATION | {"dicomnet.proto"}), f"{module_name(path)}: {name}"


@pytest.mark.parametrize("name", sorted(SHELL))
def test_the_shell_knows_no_service(name: str) -> None:
    path = PACKAGE / (name.split(".")[1] + ".py")
    for imported in imports(path):
        if imported.startswith("dicomnet"):
            assert not starts(imported, {"dicomnet.services"} | ABOVE_SERVICES), imported
    if name in ("dicomnet.association", "dicomnet.invoking", "dicomnet.performing"):
        text = path.read_text()
        for service in ("CStoreRQ", "CFindRQ", "CEchoRQ", "NActionRQ", "on_store", "on_find"):
            assert service not in text


@pytest.mark.parametrize("path", modules("services"), ids=lambda p: p.name)
def test_services_sit_under_the_client_and_server(path: Path) -> None:
    for name in imports(path):
        assert not starts(name, ABOVE_SERVICES), f"{module_name(path)} imports {name}"


@pytest.mark.parametrize("path", modules("pacs"), ids=lambda p: p.name)
def test_the_pacs_does_not_import_the_commands(path: Path) -> None:
    for name in imports(path):
        assert not starts(name, {"dicomnet.cli"}), f"{module_name(path)} imports {name}"


@pytest.mark.parametrize("path", modules("route"), ids=lambda p: p.name)
def test_the_router_stands_beside_the_pacs(path: Path) -> None:
    for name in imports(path):
        assert not starts(name, {"dicomnet.cli", "dicomnet.pacs"}), f"{module_name(path)}: {name}"
