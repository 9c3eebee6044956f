"""`import dicomnet` is light: the public API is imported when first used (PEP 562)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import dicomnet


def test_every_public_name_resolves_and_is_listed() -> None:
    for name in dicomnet.__all__:
        assert getattr(dicomnet, name) is not None, name
    assert set(dicomnet.__all__) <= set(dir(dicomnet))
    assert dicomnet.connect is dicomnet.connect  # remembered after the first use


def test_an_unknown_name_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'no_such_thing'"):
        dicomnet.no_such_thing  # noqa: B018


def test_importing_the_package_loads_neither_asyncio_nor_pydicom() -> None:
    """What a process that needs one part (the indexer of `serve`) does not pay for."""
    code = (
        "import sys, dicomnet; "
        "print(sorted(m for m in ('asyncio', 'pydicom', 'anyio') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"
    code = "import sys; import dicomnet.pacs.indexer_process; print('asyncio' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"
