"""Query/Retrieve interoperability with DCMTK, in both directions (issue 3, "Must show").

The data set (``qr_data``, ~300 instances in 5 patients, 12 studies, ~30 series)
is generated once per session; ``qr_data.expected_matches`` says what every
query must return, independently of dicomnet and of DCMTK.

- ``dicomnet find / move / get`` against DCMTK ``dcmqrscp`` (configured here:
  storage area indexed by ``dcmqridx``, a peer table with a DCMTK ``storescp`` as
  move destination): the identifiers found are the expected ones (every requested
  key compared), the instances retrieved (by C-GET into ``--out``, by C-MOVE into
  storescp) are exactly the expected ones with data sets byte-identical to the
  generated files, the counts printed are right; an unknown destination gives
  0xA801 and a non-zero exit.
- DCMTK ``findscu`` (``-P`` and ``-S``, every level, wildcard / range / UID list
  keys), ``movescu`` (to a DCMTK ``storescp`` and to a second ``dicomnet serve``,
  both known to the server through ``--peer``) and ``getscu`` (``+B``) against
  ``dicomnet serve`` loaded with the data by ``dicomnet store``: the right
  matches, the right counts in the C-MOVE / C-GET responses, every file
  byte-identical.
- A C-MOVE to a destination that is down (its ``--peer`` entry points at a closed
  port) or unknown (not in the table): the failure status (0xA801 for unknown; a
  failure with failed = number of matches for down) as movescu and
  ``dicomnet move`` see it, and the server goes on answering C-ECHO and C-FIND.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import qr_data
from peers import (
    HOST,
    DicomnetServer,
    StoreSCP,
    describe_cli,
    echoscu,
    free_port,
    index_part10_tree,
    run_dicomnet,
    start_storescp,
    verify_part10_received,
)
from qr_data import QRData
from qr_peers import (
    DCMQRSCP_UNSUPPORTED_KEYS,
    DcmQRSCP,
    RetrieveOutcome,
    dcmtk_environment,
    describe,
    dicomnet_find,
    dicomnet_get,
    dicomnet_move,
    expected_of,
    findscu,
    getscu,
    load_server,
    movescu,
    require_qr_dcmtk,
    start_dcmqrscp,
    start_qr_server,
    verify_retrieved,
    wait_files,
    without_keys,
)

pytestmark = pytest.mark.dcmtk

SERVER_AET = "QRSCP"
SECOND_AET = "SECOND"
STORESCP_AET = "STORESCP"
DOWN_AET = "DOWNDEST"  # in the peer tables, at a port nobody listens on
UNKNOWN_AET = "NOSUCHAE"  # in no peer table


@pytest.fixture(scope="session")
def qr_dataset(tmp_path_factory: pytest.TempPathFactory) -> QRData:
    data = qr_data.session_data(tmp_path_factory)
    print(data.summary())
    return data


@pytest.fixture(scope="module", autouse=True)
def _dcmtk_env() -> Iterator[None]:
    """DCMTK present (or skip), and every DCMTK process started with TCP_NODELAY."""
    require_qr_dcmtk()
    with dcmtk_environment():
        yield


def _logs(*servers: object) -> str:
    out = []
    for server in servers:
        log_text = getattr(server, "log_text", None)
        if log_text is not None:
            out.append(f"--- {type(server).__name__} log (tail) ---\n{log_text(6000)}")
    return "\n".join(out)


def _clear(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            path.unlink()


def _assert_final(
    out: RetrieveOutcome, *, status: int, completed: int, failed: int = 0, context: str = ""
) -> None:
    final = out.final
    assert final is not None, f"no final response\n{describe(out)}\n{context}"
    got = (final.status, final.completed, final.failed, final.warning)
    assert got == (status, completed, failed, 0), (
        f"final (status, completed, failed, warning) = {got}, expected "
        f"{(status, completed, failed, 0)}\n{describe(out)}\n{context}"
    )


def _check_pending(out: RetrieveOutcome, total: int, context: str = "") -> None:
    """Pending responses count down and always add up to the number of matches."""
    pending = [p for p in out.pending if p.remaining is not None]
    remaining = [p.remaining for p in pending]
    assert remaining == sorted(remaining, reverse=True), f"{remaining}\n{describe(out)}"
    for p in pending:
        assert (p.remaining or 0) + (p.completed or 0) + (p.failed or 0) + (
            p.warning or 0
        ) == total, f"{p}\n{describe(out)}\n{context}"


# ==========================================================================
# dicomnet find / move / get -> DCMTK dcmqrscp


@dataclass
class DcmtkArchive:
    qrscp: DcmQRSCP
    storescp: StoreSCP


@pytest.fixture(scope="module")
def dcmtk_archive(
    qr_dataset: QRData, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DcmtkArchive]:
    require_qr_dcmtk()
    workdir = tmp_path_factory.mktemp("dcmqrscp")
    scp = start_storescp(workdir / "storescp", aet=STORESCP_AET)
    qrscp: DcmQRSCP | None = None
    try:
        qrscp = start_dcmqrscp(
            workdir / "qrscp",
            [i.path for i in qr_dataset.instances],
            peers={STORESCP_AET: (HOST, scp.port), DOWN_AET: (HOST, free_port())},
        )
        yield DcmtkArchive(qrscp, scp)
    finally:
        if qrscp is not None:
            qrscp.stop()
        scp.stop()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", qr_data.QUERY_CASE_NAMES)
def test_dicomnet_find_against_dcmqrscp(
    name: str, qr_dataset: QRData, dcmtk_archive: DcmtkArchive
) -> None:
    qrscp = dcmtk_archive.qrscp
    # dcmqrscp does not index some return keys: they are not asked for here.
    case = without_keys(qr_data.query_cases(qr_dataset)[name], DCMQRSCP_UNSUPPORTED_KEYS)
    expected = case.expected(qr_dataset)
    out = dicomnet_find(qrscp.port, case.keys, level=case.level, model=case.model,
                        aec=qrscp.aet)  # fmt: skip
    assert out.result.returncode == 0, describe(out) + _logs(qrscp)
    got = out.rows(case.return_keys)
    assert len(got) == len(expected), describe(out)
    assert qr_data.rows_set(got) == qr_data.rows_set(expected), describe(out)
    assert f"{len(expected)} match(es)" in out.result.stderr, describe(out)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", qr_data.RETRIEVE_CASE_NAMES)
def test_dicomnet_get_against_dcmqrscp(
    name: str, qr_dataset: QRData, dcmtk_archive: DcmtkArchive, tmp_path: Path
) -> None:
    qrscp = dcmtk_archive.qrscp
    case = qr_data.retrieve_cases(qr_dataset)[name]
    expected = case.expected(qr_dataset)
    out_dir = tmp_path / "got"
    out = dicomnet_get(qrscp.port, case.keys, level=case.level, model=case.model,
                       out_dir=out_dir, aec=qrscp.aet)  # fmt: skip
    assert out.result.returncode == 0, describe(out) + _logs(qrscp)
    problems = verify_retrieved(expected, out_dir, filename_is_uid=True)
    assert not problems, "\n".join(problems[:20]) + "\n" + describe(out)
    _assert_final(out, status=0x0000, completed=len(expected))
    assert f"received {len(expected)} instance(s)" in out.result.stderr, describe(out)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", qr_data.RETRIEVE_CASE_NAMES)
def test_dicomnet_move_against_dcmqrscp_to_storescp(
    name: str, qr_dataset: QRData, dcmtk_archive: DcmtkArchive
) -> None:
    qrscp, scp = dcmtk_archive.qrscp, dcmtk_archive.storescp
    _clear(scp.out_dir)
    case = qr_data.retrieve_cases(qr_dataset)[name]
    expected = case.expected(qr_dataset)
    out = dicomnet_move(qrscp.port, case.keys, level=case.level, model=case.model,
                        dest=STORESCP_AET, aec=qrscp.aet)  # fmt: skip
    logs = _logs(qrscp, scp)
    assert out.result.returncode == 0, describe(out) + logs
    _assert_final(out, status=0x0000, completed=len(expected), context=logs)
    assert out.pending, "no pending responses printed\n" + describe(out)
    _check_pending(out, len(expected))
    wait_files(scp.out_dir, len(expected))
    problems = verify_retrieved(expected, scp.out_dir, filename_is_uid=False)
    assert not problems, "\n".join(problems[:20]) + "\n" + describe(out)


@pytest.mark.timeout(60)
def test_dicomnet_move_unknown_destination_against_dcmqrscp(
    qr_dataset: QRData, dcmtk_archive: DcmtkArchive
) -> None:
    qrscp = dcmtk_archive.qrscp
    case = qr_data.retrieve_cases(qr_dataset)["patient-STUDY"]
    out = dicomnet_move(qrscp.port, case.keys, level=case.level, model=case.model,
                        dest=UNKNOWN_AET, aec=qrscp.aet)  # fmt: skip
    assert out.result.returncode != 0, describe(out)
    assert "0xA801" in out.result.stdout + out.result.stderr, describe(out) + _logs(qrscp)
    if out.final is not None:
        assert out.final.status == 0xA801, describe(out)


# ==========================================================================
# DCMTK findscu / movescu / getscu -> dicomnet serve


@dataclass
class ServeArchive:
    server: DicomnetServer  # loaded with the data set, peers below in --peer
    second: DicomnetServer  # an empty dicomnet serve, move destination SECOND
    storescp: StoreSCP  # move destination STORESCP
    down_port: int  # DOWNDEST's port: nobody listens there

    def logs(self) -> str:
        return _logs(self.server, self.storescp)


@pytest.fixture(scope="module")
def serve_archive(
    qr_dataset: QRData, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeArchive]:
    require_qr_dcmtk()
    workdir = tmp_path_factory.mktemp("qr-serve")
    started: list[object] = []
    try:
        scp = start_storescp(workdir / "storescp", aet=STORESCP_AET)
        started.append(scp)
        second = start_qr_server(workdir / "second", aet=SECOND_AET)
        started.append(second)
        down_port = free_port()
        server = start_qr_server(
            workdir / "server",
            aet=SERVER_AET,
            peers={
                STORESCP_AET: (HOST, scp.port),
                SECOND_AET: (HOST, second.port),
                DOWN_AET: (HOST, down_port),
            },
        )
        started.append(server)
        load_server(server, qr_dataset, SERVER_AET)
        yield ServeArchive(server, second, scp, down_port)
    finally:
        for proc in reversed(started):
            with contextlib.suppress(Exception):
                proc.stop()  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_serve_stored_the_data_set(qr_dataset: QRData, serve_archive: ServeArchive) -> None:
    """The starting point: every instance stored bit-preserving, as <uid>.dcm."""
    problems = verify_part10_received(
        expected_of(qr_dataset.instances),
        serve_archive.server.stored(),
        filename_is_uid=True,
    )
    assert not problems, "\n".join(problems[:20])


def _find_cases() -> list[str]:
    return [*qr_data.QUERY_CASE_NAMES, qr_data.CASE_INSENSITIVE_PN.name]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", _find_cases())
def test_findscu_against_serve(
    name: str, qr_dataset: QRData, serve_archive: ServeArchive, tmp_path: Path
) -> None:
    server = serve_archive.server
    if name == qr_data.CASE_INSENSITIVE_PN.name:
        # PS3.4 C.2.2.2.1 lets PN matching ignore case; issue 3 asks for it.
        case = qr_data.CASE_INSENSITIVE_PN
    else:
        case = qr_data.query_cases(qr_dataset)[name]
    expected = case.expected(qr_dataset)
    out = findscu(server.port, case.keys, level=case.level, model=case.model,
                  out_dir=tmp_path / "rsp", aec=SERVER_AET)  # fmt: skip
    assert out.result.returncode == 0, describe(out) + serve_archive.logs()
    assert "Final Find Response (Success)" in out.result.output, describe(out)
    got = out.rows(case.return_keys)
    assert len(got) == len(expected), describe(out) + f"\nexpected {expected}"
    assert qr_data.rows_set(got) == qr_data.rows_set(expected), (
        describe(out) + f"\nexpected {expected}\ngot {got}"
    )
    for ds in out.identifiers:
        assert str(ds.get("QueryRetrieveLevel", "")).strip() == case.level


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", qr_data.RETRIEVE_CASE_NAMES)
def test_movescu_serve_to_storescp(
    name: str, qr_dataset: QRData, serve_archive: ServeArchive
) -> None:
    server, scp = serve_archive.server, serve_archive.storescp
    _clear(scp.out_dir)
    case = qr_data.retrieve_cases(qr_dataset)[name]
    expected = case.expected(qr_dataset)
    out = movescu(server.port, case.keys, level=case.level, model=case.model,
                  dest=STORESCP_AET, aec=SERVER_AET)  # fmt: skip
    logs = serve_archive.logs()
    assert out.result.returncode == 0, describe(out) + logs
    _assert_final(out, status=0x0000, completed=len(expected), context=logs)
    _check_pending(out, len(expected), logs)
    wait_files(scp.out_dir, len(expected))
    problems = verify_retrieved(expected, scp.out_dir, filename_is_uid=False)
    assert not problems, "\n".join(problems[:20]) + "\n" + describe(out)


@pytest.mark.timeout(90)
def test_movescu_serve_to_second_serve(qr_dataset: QRData, serve_archive: ServeArchive) -> None:
    """Every instance, moved to another dicomnet serve, stored there byte-identical."""
    server, second = serve_archive.server, serve_archive.second
    case = qr_data.retrieve_cases(qr_dataset)["study-STUDY-all-studies"]
    expected = case.expected(qr_dataset)
    out = movescu(server.port, case.keys, level=case.level, model=case.model,
                  dest=SECOND_AET, aec=SERVER_AET)  # fmt: skip
    logs = serve_archive.logs() + _logs(second)
    assert out.result.returncode == 0, describe(out) + logs
    _assert_final(out, status=0x0000, completed=len(expected), context=logs)
    _check_pending(out, len(expected), logs)
    stored = second.wait_stored([i.uid for i in expected], timeout=20)
    problems = verify_part10_received(expected_of(expected), stored, filename_is_uid=True)
    assert not problems, "\n".join(problems[:20]) + "\n" + describe(out)


@pytest.mark.timeout(90)
@pytest.mark.parametrize("name", qr_data.RETRIEVE_CASE_NAMES)
def test_getscu_against_serve(
    name: str, qr_dataset: QRData, serve_archive: ServeArchive, tmp_path: Path
) -> None:
    server = serve_archive.server
    case = qr_data.retrieve_cases(qr_dataset)[name]
    expected = case.expected(qr_dataset)
    out_dir = tmp_path / "got"
    out = getscu(server.port, case.keys, level=case.level, model=case.model, out_dir=out_dir,
                 aec=SERVER_AET)  # fmt: skip
    logs = serve_archive.logs()
    assert out.result.returncode == 0, describe(out) + logs
    _assert_final(out, status=0x0000, completed=len(expected), context=logs)
    _check_pending(out, len(expected), logs)
    problems = verify_retrieved(expected, out_dir, filename_is_uid=False)
    assert not problems, "\n".join(problems[:20]) + "\n" + describe(out)
    assert len(index_part10_tree(out_dir)) == len(expected)


def _assert_still_serving(qr_dataset: QRData, archive: ServeArchive, tmp_path: Path) -> None:
    server = archive.server
    assert server.alive(), archive.logs()
    echo = echoscu(server.port, aec=SERVER_AET)
    assert echo.returncode == 0, f"{echo}\n{archive.logs()}"
    case = qr_data.query_cases(qr_dataset)["study-STUDY-all"]
    out = findscu(server.port, case.keys, level=case.level, model=case.model,
                  out_dir=tmp_path / "after", aec=SERVER_AET)  # fmt: skip
    assert out.result.returncode == 0, describe(out) + archive.logs()
    assert qr_data.rows_set(out.rows(case.return_keys)) == qr_data.rows_set(
        case.expected(qr_dataset)
    ), describe(out)


@pytest.mark.timeout(90)
def test_move_to_unknown_destination_serve(
    qr_dataset: QRData, serve_archive: ServeArchive, tmp_path: Path
) -> None:
    server = serve_archive.server
    case = qr_data.retrieve_cases(qr_dataset)["patient-STUDY"]
    out = movescu(server.port, case.keys, level=case.level, model=case.model,
                  dest=UNKNOWN_AET, aec=SERVER_AET)  # fmt: skip
    final = out.final
    assert final is not None, describe(out) + serve_archive.logs()
    assert final.status == 0xA801, describe(out) + serve_archive.logs()
    assert not out.pending, "no sub-operation can have been attempted\n" + describe(out)

    cli = dicomnet_move(server.port, case.keys, level=case.level, model=case.model,
                        dest=UNKNOWN_AET, aec=SERVER_AET)  # fmt: skip
    assert cli.result.returncode != 0, describe(cli)
    assert "0xA801" in cli.result.stdout + cli.result.stderr, describe(cli)
    _assert_still_serving(qr_dataset, serve_archive, tmp_path)


def _is_failure(status: int) -> bool:
    return (status & 0xF000) in (0xA000, 0xC000)


@pytest.mark.timeout(120)
def test_move_to_destination_down_serve(
    qr_dataset: QRData, serve_archive: ServeArchive, tmp_path: Path
) -> None:
    server = serve_archive.server
    case = qr_data.retrieve_cases(qr_dataset)["patient-STUDY"]
    expected = case.expected(qr_dataset)
    out = movescu(server.port, case.keys, level=case.level, model=case.model,
                  dest=DOWN_AET, aec=SERVER_AET)  # fmt: skip
    final = out.final
    logs = serve_archive.logs()
    assert final is not None, describe(out) + logs
    assert _is_failure(final.status), f"status 0x{final.status:04X}\n" + describe(out) + logs
    assert (final.completed or 0, final.failed) == (0, len(expected)), describe(out) + logs

    cli = dicomnet_move(server.port, case.keys, level=case.level, model=case.model,
                        dest=DOWN_AET, aec=SERVER_AET)  # fmt: skip
    assert cli.result.returncode != 0, describe(cli)
    text = cli.result.stdout + cli.result.stderr
    assert f"0x{final.status:04X}" in text, describe(cli)
    if cli.final is not None:
        assert (cli.final.status, cli.final.failed) == (final.status, len(expected)), describe(cli)
    _assert_still_serving(qr_dataset, serve_archive, tmp_path)


@pytest.mark.timeout(120)
def test_index_from_files_and_reindex(qr_dataset: QRData, tmp_path: Path) -> None:
    """The index is rebuilt from files put in the storage folder by hand: by
    ``dicomnet index DIR``, then by ``dicomnet serve --reindex`` after more files
    were added while the server was down; what findscu and getscu see follows."""
    series = sorted(qr_dataset.entities("SERIES"))[-1]
    held_back = [i for i in qr_dataset.instances if i.attrs["SeriesInstanceUID"] == series]
    first = [i for i in qr_dataset.instances if i.attrs["SeriesInstanceUID"] != series]
    workdir = tmp_path / "serve"
    storage = workdir / "storage"

    def place(instances: list[qr_data.Instance]) -> None:
        for inst in instances:  # the documented layout: <uid>.dcm anywhere below
            target = storage / inst.attrs["PatientID"] / f"{inst.uid}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(inst.path, target)

    place(first)
    r = run_dicomnet(["index", storage])
    assert r.returncode == 0, describe_cli(r)
    assert f"indexed {len(first)} instance(s)" in r.stdout, describe_cli(r)

    all_studies = qr_data.query_cases(qr_dataset)["study-STUDY-all"]
    image_keys = {
        "StudyInstanceUID": held_back[0].attrs["StudyInstanceUID"],
        "SeriesInstanceUID": series,
        "SOPInstanceUID": "",
        "InstanceNumber": "",
    }
    get_keys = {"StudyInstanceUID": held_back[0].attrs["StudyInstanceUID"],
                "SeriesInstanceUID": series}  # fmt: skip
    other = qr_data.retrieve_cases(qr_dataset)["study-SERIES"]
    assert not set(other.keys["SeriesInstanceUID"].split("\\")) & {series}

    server = start_qr_server(workdir, aet=SERVER_AET)
    try:
        out = findscu(server.port, all_studies.keys, level="STUDY", model="study",
                      out_dir=tmp_path / "f1", aec=SERVER_AET)  # fmt: skip
        assert out.result.returncode == 0, describe(out) + _logs(server)
        assert qr_data.rows_set(out.rows(all_studies.return_keys)) == qr_data.rows_set(
            all_studies.expected(qr_dataset)
        ), describe(out)
        out = findscu(server.port, image_keys, level="IMAGE", model="study",
                      out_dir=tmp_path / "f2", aec=SERVER_AET)  # fmt: skip
        assert out.result.returncode == 0 and out.identifiers == [], describe(out)
        got = getscu(server.port, other.keys, level=other.level, model=other.model,
                     out_dir=tmp_path / "g1", aec=SERVER_AET)  # fmt: skip
        expected = other.expected(qr_dataset)
        _assert_final(got, status=0x0000, completed=len(expected), context=_logs(server))
        problems = verify_retrieved(expected, tmp_path / "g1", filename_is_uid=False)
        assert not problems, "\n".join(problems[:20])
    finally:
        server.stop()

    place(held_back)  # while the server is down
    server = start_qr_server(workdir, aet=SERVER_AET, extra_args=["--reindex"])
    try:
        out = findscu(server.port, image_keys, level="IMAGE", model="study",
                      out_dir=tmp_path / "f3", aec=SERVER_AET)  # fmt: skip
        assert out.result.returncode == 0, describe(out) + _logs(server)
        assert {r["SOPInstanceUID"] for r in out.rows(["SOPInstanceUID"])} == {
            i.uid for i in held_back
        }, describe(out)
        got = getscu(server.port, get_keys, level="SERIES", model="study",
                     out_dir=tmp_path / "g2", aec=SERVER_AET)  # fmt: skip
        _assert_final(got, status=0x0000, completed=len(held_back), context=_logs(server))
        problems = verify_retrieved(held_back, tmp_path / "g2", filename_is_uid=False)
        assert not problems, "\n".join(problems[:20])
    finally:
        server.stop()
