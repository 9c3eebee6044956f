"""TLS against real peers: DCMTK 3.6.7 (`+tls`, `+tla`, `+cf`, its default "non-downgrading
BCP 195" profile) and pynetdicom with an `ssl.SSLContext`, both ways; and `dicomnet serve`
sending C-MOVE sub-operations to a TLS move destination (`--peer AET=tls://HOST:PORT`).

Certificates are made by the test (`tls_certs`). DCMTK takes `+tls KEY CERT` in PEM (its
default, `-pem`) and trusts what `+cf` names; storescp requires a client certificate
unless told otherwise (`-rc`, its default).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest
from peers import (
    HOST,
    DicomnetServer,
    StoreSCP,
    describe_cli,
    echoscu,
    free_port,
    pynetdicom_ae,
    run_dicomnet,
    storescu,
    wait_until,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from tls_certs import PKI, KeyPair, make_pki

import dicomnet
from dicomnet.proto.contexts import PresentationContext
from dicomnet.tls import client_context, server_context

pytestmark = pytest.mark.timeout(120)

VERIFICATION = "1.2.840.10008.1.1"
CT_FILE = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


def serve_tls(pki: PKI, *, require_client: bool = False) -> list[str]:
    args = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    return [*args, "--tls-ca", str(pki.ca)] if require_client else args


def dcmtk_tls(pair: KeyPair, ca: Path) -> list[str]:
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(ca)]


def handshake_lines(server: DicomnetServer) -> list[str]:
    return [line for line in server.log_text(None).splitlines() if "TLS handshake" in line]


def assert_clean_log(server: DicomnetServer) -> None:
    text = server.log_text(None)
    assert "Traceback" not in text and "Fatal error" not in text, text


# --- DCMTK as requestor, `dicomnet serve --tls-cert --tls-key` ----------------------------


@pytest.mark.dcmtk
def test_dcmtk_echoscu_and_storescu_tls(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    server = dicomnet_server(extra_args=serve_tls(pki))
    echo = echoscu(server.port, extra_args=["-d", *dcmtk_tls(pki.client, pki.ca)])
    assert echo.returncode == 0, echo
    assert "Protocol    : TLSv1.3" in echo.output, echo
    source = dcmread(CT_FILE)
    source.SOPInstanceUID = uid = generate_uid()
    path = tmp_path / "ct.dcm"
    source.save_as(path)
    sent = storescu(server.port, [path], extra_args=dcmtk_tls(pki.client, pki.ca))
    assert sent.returncode == 0, sent
    assert uid in server.wait_stored([uid])
    assert handshake_lines(server) == []
    assert_clean_log(server)


@pytest.mark.dcmtk
def test_dcmtk_anonymous_tls_client(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    """`+tla`: TLS without a client certificate, accepted by a server without --tls-ca."""
    server = dicomnet_server(extra_args=serve_tls(pki))
    echo = echoscu(server.port, extra_args=["+tla", "+cf", str(pki.ca)])
    assert echo.returncode == 0, echo


@pytest.mark.dcmtk
def test_dcmtk_refuses_untrusted_dicomnet_server(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    server = dicomnet_server(extra_args=serve_tls(pki))
    echo = echoscu(server.port, extra_args=dcmtk_tls(pki.client, pki.other_ca))
    assert echo.returncode != 0 and "certificate verify failed" in echo.output, echo
    assert wait_until(lambda: len(handshake_lines(server)) == 1, 10), server.log_text()
    assert echoscu(server.port, extra_args=dcmtk_tls(pki.client, pki.ca)).returncode == 0


@pytest.mark.dcmtk
def test_dcmtk_client_certificates_with_tls_ca(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    """serve --tls-ca: a good certificate accepted, none or another CA's refused, one log
    line each, and the server keeps serving."""
    server = dicomnet_server(extra_args=serve_tls(pki, require_client=True))
    none = echoscu(server.port, extra_args=["+tla", "+cf", str(pki.ca)])
    assert none.returncode != 0, none
    assert wait_until(lambda: len(handshake_lines(server)) == 1, 10), server.log_text()
    assert "presented no certificate" in handshake_lines(server)[0]
    other = echoscu(server.port, extra_args=dcmtk_tls(pki.other_client, pki.ca))
    assert other.returncode != 0, other
    assert wait_until(lambda: len(handshake_lines(server)) == 2, 10), server.log_text()
    assert "client certificate verify failed" in handshake_lines(server)[1]
    good = echoscu(server.port, extra_args=dcmtk_tls(pki.client, pki.ca))
    assert good.returncode == 0, good
    assert len(handshake_lines(server)) == 2
    assert_clean_log(server)


@pytest.mark.dcmtk
def test_dcmtk_plain_echoscu_to_tls_port(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    server = dicomnet_server(extra_args=serve_tls(pki))
    plain = echoscu(server.port)
    assert plain.returncode != 0, plain
    assert wait_until(lambda: len(handshake_lines(server)) == 1, 10), server.log_text()
    assert "plain DICOM connection to the TLS port" in handshake_lines(server)[0]
    assert echoscu(server.port, extra_args=["+tla", "+cf", str(pki.ca)]).returncode == 0
    assert_clean_log(server)


# --- dicomnet as requestor, DCMTK storescp +tls -------------------------------------------


def our_tls(pki: PKI, ca: Path | None = None, client: bool = True) -> list[str]:
    args = ["--tls", "--tls-ca", str(ca or pki.ca)]
    if client:
        args += ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    return args


@pytest.fixture
def tls_storescp(pki: PKI, storescp: Callable[..., StoreSCP]) -> StoreSCP:
    return storescp(extra_args=dcmtk_tls(pki.server, pki.ca))


@pytest.mark.dcmtk
def test_dicomnet_echo_and_store_to_dcmtk_tls(
    pki: PKI, tls_storescp: StoreSCP, tmp_path: Path
) -> None:
    echo = run_dicomnet(["echo", HOST, tls_storescp.port, "--aec", "STORESCP", *our_tls(pki)])
    assert echo.returncode == 0, describe_cli(echo)
    source = dcmread(CT_FILE)
    source.SOPInstanceUID = uid = generate_uid()
    path = tmp_path / "ct.dcm"
    source.save_as(path)
    store = run_dicomnet(["store", HOST, tls_storescp.port, path, *our_tls(pki)])
    assert store.returncode == 0, describe_cli(store)
    assert uid in tls_storescp.wait_received(1)


@pytest.mark.dcmtk
def test_dicomnet_refuses_untrusted_dcmtk_server(pki: PKI, tls_storescp: StoreSCP) -> None:
    echo = run_dicomnet(["echo", HOST, tls_storescp.port, *our_tls(pki, ca=pki.other_ca)])
    assert echo.returncode != 0, describe_cli(echo)
    lines = echo.stderr.strip().splitlines()
    assert len(lines) == 1, describe_cli(echo)
    assert "certificate verify failed" in lines[0] and "TLS" in lines[0]
    assert tls_storescp.alive()


@pytest.mark.dcmtk
def test_dicomnet_without_client_certificate_told_why(pki: PKI, tls_storescp: StoreSCP) -> None:
    """storescp requires a client certificate by default (-rc)."""
    echo = run_dicomnet(["echo", HOST, tls_storescp.port, *our_tls(pki, client=False)])
    assert echo.returncode != 0, describe_cli(echo)
    assert "certificate" in echo.stderr and "TLS" in echo.stderr, describe_cli(echo)
    assert len(echo.stderr.strip().splitlines()) == 1, describe_cli(echo)


@pytest.mark.dcmtk
def test_dicomnet_tls_to_plain_dcmtk(pki: PKI, storescp: Callable[..., StoreSCP]) -> None:
    plain = storescp()
    echo = run_dicomnet(["echo", HOST, plain.port, "--timeout", "10", *our_tls(pki)])
    assert echo.returncode != 0, describe_cli(echo)
    assert "TLS" in echo.stderr, describe_cli(echo)
    assert plain.alive()


# --- command line: unusable files ----------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--tls-cert", "/nonexistent/client.crt"],
        ["--tls-ca", "/nonexistent/ca.pem"],
        "wrong-key",
    ],
)
def test_unusable_tls_files_exit_2(pki: PKI, args: list[str] | str) -> None:
    if args == "wrong-key":
        args = ["--tls-cert", str(pki.client.cert), "--tls-key", str(pki.server.key)]
    result = run_dicomnet(["echo", HOST, free_port(), *args])
    assert result.returncode == 2, describe_cli(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dicomnet echo: TLS:"), describe_cli(result)


def test_serve_with_unusable_tls_files_exits_2(pki: PKI, tmp_path: Path) -> None:
    result = run_dicomnet(
        ["serve", "--port", "0", "--storage", tmp_path, "--tls-cert", pki.server.cert,
         "--tls-key", pki.client.key]
    )  # fmt: skip
    assert result.returncode == 2, describe_cli(result)
    assert "key values mismatch" in result.stderr, describe_cli(result)
    result = run_dicomnet(["serve", "--port", "0", "--storage", tmp_path, "--tls-ca", pki.ca])
    assert result.returncode == 2 and "--tls-cert" in result.stderr, describe_cli(result)


# --- pynetdicom, both ways -----------------------------------------------------------------


def test_pynetdicom_tls_server_and_our_client(pki: PKI) -> None:
    """pynetdicom's `start_server(ssl_context=)` with a plain Python server context."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki.server.cert, pki.server.key)
    ae = pynetdicom_ae("PYNETSCP")
    ae.add_supported_context(VERIFICATION)
    port = free_port()
    server = ae.start_server((HOST, port), block=False, ssl_context=context)
    try:

        async def echo(tls: ssl.SSLContext) -> int:
            async with dicomnet.connect(
                HOST, port, aec="PYNETSCP", contexts=[PresentationContext(VERIFICATION)], tls=tls
            ) as association:
                return int(await association.echo())

        assert anyio.run(echo, client_context(pki.ca)) == 0
        with pytest.raises(dicomnet.TLSError, match="certificate verify failed"):
            anyio.run(echo, client_context(pki.other_ca))
        assert anyio.run(echo, client_context(pki.ca)) == 0
    finally:
        server.shutdown()


def test_pynetdicom_tls_client_to_serve(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer]
) -> None:
    """pynetdicom's `associate(tls_args=)`, presenting a client certificate to
    `serve --tls-ca`, and checking our certificate's host name (localhost)."""
    server = dicomnet_server(extra_args=serve_tls(pki, require_client=True))
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    context.load_cert_chain(pki.client.cert, pki.client.key)
    ae = pynetdicom_ae("PYNETSCU")
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(HOST, server.port, tls_args=(context, "localhost"))
    try:
        assert assoc.is_established
        status = assoc.send_c_echo()
        assert status.Status == 0
    finally:
        assoc.release()
    bare = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki.ca))
    refused = ae.associate(HOST, server.port, tls_args=(bare, "localhost"))
    assert not refused.is_established
    assert wait_until(lambda: len(handshake_lines(server)) == 1, 10), server.log_text()
    assert "presented no certificate" in handshake_lines(server)[0]
    assert_clean_log(server)


# --- serve: C-MOVE to a TLS move destination -----------------------------------------------


def test_serve_moves_to_tls_destination(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    """`serve --peer ME=tls://...`: the sub-operations go over TLS (serve presenting its
    --tls-cert to a listener that requires client certificates)."""
    listen_port = free_port()
    server = dicomnet_server(
        extra_args=[
            *serve_tls(pki, require_client=True),
            "--peer", f"ME=tls://{HOST}:{listen_port}",
        ]
    )  # fmt: skip
    source = store_new_ct(server, pki, tmp_path)
    uid = source.SOPInstanceUID

    async def move() -> list[str]:
        listening = server_context(pki.client.cert, pki.client.key, ca=pki.ca)
        async with dicomnet.retrieve_listener("ME", HOST, listen_port, tls=listening) as ear:
            contexts = [PresentationContext("1.2.840.10008.5.1.4.1.2.2.2")]
            tls = client_context(pki.ca, pki.client.cert, pki.client.key)
            async with dicomnet.connect(
                HOST, server.port, aet="ME", aec="DICOMNET", contexts=contexts, tls=tls
            ) as association:
                query = dicomnet_query(source.StudyInstanceUID)
                responses = association.retrieve(query, model="study", listener=ear)
                return [instance.sop_instance_uid async for instance in responses]

    assert anyio.run(move) == [uid]
    assert handshake_lines(server) == []
    assert_clean_log(server)


def store_new_ct(server: DicomnetServer, pki: PKI, tmp_path: Path) -> Dataset:
    """A CT instance of a new SOP Instance UID, stored into `server` over TLS."""
    source = dcmread(CT_FILE)
    source.SOPInstanceUID = generate_uid()
    path = tmp_path / "ct.dcm"
    source.save_as(path)
    store = run_dicomnet(["store", HOST, server.port, path, *our_tls(pki)])
    assert store.returncode == 0, describe_cli(store)
    return source


def dicomnet_query(study_uid: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    return query


def test_cli_get_via_move_over_tls(
    pki: PKI, dicomnet_server: Callable[..., DicomnetServer], tmp_path: Path
) -> None:
    """`dicomnet get --via move` with TLS flags: its listener serves TLS (requiring
    serve's certificate) and serve reaches it as `--peer DICOMNET=tls://...`."""
    listen_port = free_port()
    server = dicomnet_server(
        extra_args=[
            *serve_tls(pki, require_client=True),
            "--peer", f"DICOMNET=tls://{HOST}:{listen_port}",
        ]
    )  # fmt: skip
    source = store_new_ct(server, pki, tmp_path)
    uid = source.SOPInstanceUID
    out = tmp_path / "out"
    get = run_dicomnet(
        ["get", HOST, server.port, "--out", out, "--via", "move", "--listen-port", listen_port,
         "-k", f"StudyInstanceUID={source.StudyInstanceUID}", *our_tls(pki)]
    )  # fmt: skip
    assert get.returncode == 0, describe_cli(get)
    assert (out / f"{uid}.dcm").is_file(), describe_cli(get)
    assert handshake_lines(server) == []
