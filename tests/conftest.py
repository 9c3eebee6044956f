"""Fixtures for the end-to-end tests: the corpus, and real peers that are always stopped.

Set ``DICOMNET_REQUIRE_DCMTK=1`` (CI may) to make a missing DCMTK a failure
instead of a skip; ``DICOMNET_REQUIRE_POSTGRESQL=1`` the same for PostgreSQL.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

# The helper modules live next to this file (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import corpus as corpus_mod
import peers
import postgres

log = logging.getLogger("dicomnet.tests")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dcmtk: needs DCMTK's command-line tools")
    config.addinivalue_line("markers", "orthanc: needs Orthanc (apt-get install orthanc)")
    config.addinivalue_line("markers", "slow: large transfers")
    config.addinivalue_line("markers", "fuzz: a bounded atheris pass over each fuzz target")


def _missing(item: pytest.Item) -> tuple[str, str] | None:
    """(what is missing, the variable that makes it a failure) for a test's peer."""
    if item.get_closest_marker("dcmtk") is not None:
        missing = peers.dcmtk_missing()
        if missing:
            text = f"DCMTK tools not installed: {', '.join(missing)} (apt-get install dcmtk)"
            return text, "DICOMNET_REQUIRE_DCMTK"
    if item.get_closest_marker("orthanc") is not None:
        import orthanc_peer

        why = orthanc_peer.orthanc_missing()
        if why:
            return (
                f"Orthanc cannot run: {why} (apt-get install orthanc)",
                "DICOMNET_REQUIRE_ORTHANC",
            )
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    missing = _missing(item)
    if missing is None:
        return
    message, required = missing
    if os.environ.get(required):
        pytest.fail(message)
    pytest.skip(message)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def _failed(request: pytest.FixtureRequest) -> bool:
    node = request.node
    return any(
        getattr(getattr(node, f"rep_{when}", None), "failed", False) for when in ("setup", "call")
    )


@pytest.fixture(scope="session")
def postgresql_server() -> Iterator[postgres.Server]:
    """A private PostgreSQL server for the whole run (tests/postgres.py)."""
    why = postgres.missing()
    if why is not None:
        if os.environ.get("DICOMNET_REQUIRE_POSTGRESQL"):
            pytest.fail(why)
        pytest.skip(why)
    server = postgres.Server()
    try:
        server.start()
        yield server
    finally:
        server.stop()


def index_location(request: pytest.FixtureRequest, backend: str, sqlite_file: Path) -> str:
    """Where a test's index lives: `sqlite_file`, or a fresh schema of the test server's
    PostgreSQL database (a URL whose ``search_path`` is that schema)."""
    if backend == "sqlite":
        return str(sqlite_file)
    server = request.getfixturevalue("postgresql_server")
    return postgres.fresh_schema(server)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> corpus_mod.Corpus:
    """The full corpus (pydicom's files in subfolders + one instance over 100 MB)."""
    built = corpus_mod.build_corpus(tmp_path_factory.mktemp("corpus"))
    print(built.summary())
    return built


@pytest.fixture
def dicomnet_server(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., peers.DicomnetServer]]:
    """Factory: ``dicomnet_server(aet=..., allow=[...], max_associations=N)``.

    Each call starts ``python -m dicomnet serve`` on a free port with its own
    storage folder and private TMPDIR, waits until it listens; every server is
    stopped at teardown, and its log is printed when the test failed.
    """
    started: list[peers.DicomnetServer] = []

    def start(**kwargs: object) -> peers.DicomnetServer:
        workdir = tmp_path / f"dicomnet-serve-{len(started)}"
        server = peers.start_dicomnet_server(workdir, **kwargs)  # type: ignore[arg-type]
        started.append(server)
        return server

    yield start
    for server in started:
        code = server.stop()
        if _failed(request):
            print(f"--- dicomnet serve log (port {server.port}, exit {code}) ---")
            print(server.log_text())


@pytest.fixture
def storescp(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., peers.StoreSCP]]:
    """Factory for DCMTK ``storescp +B +xa`` servers, stopped at teardown."""
    started: list[peers.StoreSCP] = []

    def start(**kwargs: object) -> peers.StoreSCP:
        workdir = tmp_path / f"storescp-{len(started)}"
        scp = peers.start_storescp(workdir, **kwargs)  # type: ignore[arg-type]
        started.append(scp)
        return scp

    yield start
    for scp in started:
        code = scp.stop()
        if _failed(request):
            print(f"--- storescp log (port {scp.port}, exit {code}) ---")
            print(scp.log_text())


@pytest.fixture
def pynetdicom_scp(tmp_path: Path) -> Iterator[Callable[..., peers.PynetdicomSCP]]:
    """Factory for pynetdicom storage SCPs (threads, ``block=False``), shut down at teardown."""
    started: list[peers.PynetdicomSCP] = []

    def start(**kwargs: object) -> peers.PynetdicomSCP:
        scp = peers.PynetdicomSCP(
            out_dir=tmp_path / f"pynetdicom-scp-{len(started)}",
            **kwargs,  # type: ignore[arg-type]
        ).start()
        started.append(scp)
        return scp

    yield start
    for scp in started:
        scp.stop()
