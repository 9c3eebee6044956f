"""TLS in both roles (PS3.15 §B.9, BCP 195): our requestor against our acceptor.

Certificates are made by the test (`tls_certs`). Every case runs on the default event
loop and on uvloop. Each failure is a clear error on the requestor (`TLSError`, or the
association error with a TLS hint), exactly one log line on the acceptor, and the
acceptor goes on serving. A peer that stalls in the handshake is cut at ARTIM.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from tls_certs import PKI, make_pki

import dicomnet
from dicomnet.proto.contexts import PresentationContext
from dicomnet.testing import MemoryNetwork
from dicomnet.tls import (
    BCP195_CIPHERS,
    Peer,
    TLSConfigError,
    client_context,
    server_context,
    subject_text,
)

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

HOST = "127.0.0.1"
VERIFICATION = "1.2.840.10008.1.1"
ECHO = [PresentationContext(VERIFICATION)]


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    if request.param == "uvloop":
        return ("asyncio", {"use_uvloop": True})
    return "asyncio"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("pki"))


class HandshakeLog(logging.Handler):
    """The acceptor's log lines about TLS, and anything asyncio logs."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.tls: list[str] = []
        self.asyncio: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name == "asyncio" and record.levelno >= logging.INFO:
            self.asyncio.append(message)
        elif record.name == "dicomnet" and "TLS handshake" in message:
            self.tls.append(message)


@pytest.fixture
def tls_log() -> Iterator[HandshakeLog]:
    handler = HandshakeLog()
    loggers = [logging.getLogger("dicomnet"), logging.getLogger("asyncio")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.DEBUG)
    yield handler
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


def tls_ae(**kwargs: Any) -> dicomnet.AE:
    return dicomnet.AE("TLSSCP", **kwargs)


async def echo(port: int, tls: ssl.SSLContext | None, **kwargs: Any) -> dicomnet.Status:
    kwargs.setdefault("connect_timeout", 10)
    async with dicomnet.connect(
        HOST, port, aec="TLSSCP", contexts=ECHO, tls=tls, **kwargs
    ) as association:
        return await association.echo()


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.01)


# --- contexts -----------------------------------------------------------------------------


def test_contexts_follow_bcp195(pki: PKI) -> None:
    client = client_context(pki.ca, pki.client.cert, pki.client.key)
    server = server_context(pki.server.cert, pki.server.key)
    mutual = server_context(pki.server.cert, pki.server.key, ca=pki.ca)
    for context in (client, server, mutual):
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2
        assert context.options & ssl.OP_NO_COMPRESSION
        assert context.options & ssl.OP_NO_RENEGOTIATION
        for cipher in context.get_ciphers():
            if cipher["protocol"] == "TLSv1.2":
                assert cipher["aead"], cipher["name"]
                assert cipher["kea"] in ("kx-ecdhe", "kx-dhe"), cipher["name"]
                assert cipher["name"] in BCP195_CIPHERS.split(":")
    assert client.verify_mode == ssl.CERT_REQUIRED
    assert client.check_hostname is False
    assert client_context(pki.ca, check_hostname=True).check_hostname is True
    assert server.verify_mode == ssl.CERT_NONE
    assert mutual.verify_mode == ssl.CERT_REQUIRED


def test_unusable_files_are_clear_errors(pki: PKI, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="no such file"):
        server_context(tmp_path / "missing.crt", pki.server.key)
    with pytest.raises(TLSConfigError, match="no such file"):
        client_context(tmp_path / "missing-ca.pem")
    with pytest.raises(TLSConfigError, match="cannot use certificate"):
        server_context(pki.server.cert, pki.client.key)  # the key of another certificate
    with pytest.raises(TLSConfigError, match="without its certificate"):
        client_context(pki.ca, key=pki.client.key)


def test_encrypted_key_needs_its_password(pki: PKI, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    with pytest.raises(TLSConfigError, match="is encrypted"):  # not a terminal prompt
        server_context(pki.server.cert, encrypted)
    with pytest.raises(TLSConfigError, match="cannot use certificate"):
        server_context(pki.server.cert, encrypted, password="wrong")
    assert (
        server_context(pki.server.cert, encrypted, password="secret").verify_mode == ssl.CERT_NONE
    )


def test_subject_text() -> None:
    cert = {
        "subject": (
            (("countryName", "CH"),),
            (("organizationName", "Hospital, Inc"),),
            (("commonName", "node1"),),
        )
    }
    assert subject_text(cert) == "CN=node1,O=Hospital\\, Inc,C=CH"
    assert subject_text(None) is None
    assert subject_text({}) is None


def test_peer_is_the_tuple_it_replaces(pki: PKI) -> None:
    context = client_context(pki.ca)
    peer = Peer("10.0.0.5", 2762, tls=context)
    host, port = peer
    assert (host, port) == ("10.0.0.5", 2762) == peer
    assert peer.tls is context and peer.host == "10.0.0.5" and peer.port == 2762
    ae = dicomnet.AE("PACS", peers={"SECURE": peer, "PLAIN": ("10.0.0.6", 104)})
    assert ae.peers["SECURE"] == ("10.0.0.5", 2762)
    assert ae.peer_tls("SECURE", "10.0.0.5", 2762) is context
    assert ae.peer_tls("SECURE", "10.0.0.9", 2762) is None  # not the table's address
    assert ae.peer_tls("PLAIN", "10.0.0.6", 104) is None
    assert ae.peer_tls("UNKNOWN", "10.0.0.5", 2762) is None


async def test_memory_network_refuses_a_context(pki: PKI) -> None:
    net = MemoryNetwork()
    served = server_context(pki.server.cert, pki.server.key)
    with pytest.raises(NotImplementedError, match="no TLS"):
        await net.listen(lambda stream: None, HOST, 1, tls=served)
    async with tls_ae().serve(HOST, 1, backend=net) as server:
        assert await echo(server.port, None, backend=net) == 0  # None: plain, as before
        with pytest.raises(NotImplementedError, match="no TLS"):
            await echo(server.port, client_context(pki.ca), backend=net)


# --- our requestor and our acceptor -------------------------------------------------------


async def test_echo_over_tls_with_verified_certificates(pki: PKI, tls_log: HandshakeLog) -> None:
    ae = tls_ae()
    seen: list[dicomnet.AssociationRequest] = []

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        seen.append(request)

    async with ae.serve(HOST, 0, tls=server_context(pki.server.cert, pki.server.key)) as server:
        async with dicomnet.connect(
            HOST, server.port, aec="TLSSCP", contexts=ECHO, tls=client_context(pki.ca)
        ) as association:
            assert await association.echo() == 0
            assert subject_text(association.peer_certificate) == (
                "CN=dicomnet-server,O=Test Hospital,C=CH"
            )
            (accepted,) = server.associations
            assert accepted.peer_certificate is None  # no client certificate asked for
    assert seen[0].peer_certificate is None and seen[0].peer_certificate_subject is None
    assert tls_log.tls == [] and tls_log.asyncio == []


async def test_tls12_only_peer_gets_an_aead_suite(pki: PKI) -> None:
    client = client_context(pki.ca)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    async with tls_ae().serve(
        HOST, 0, tls=server_context(pki.server.cert, pki.server.key)
    ) as server:
        async with dicomnet.connect(HOST, server.port, contexts=ECHO, tls=client) as association:
            assert await association.echo() == 0
            ssl_object = association._stream._transport.get_extra_info("ssl_object")  # type: ignore[attr-defined]
            assert ssl_object.version() == "TLSv1.2"
            assert ssl_object.cipher()[0] in BCP195_CIPHERS.split(":")


async def test_default_is_tls13(pki: PKI) -> None:
    async with tls_ae().serve(
        HOST, 0, tls=server_context(pki.server.cert, pki.server.key)
    ) as server:
        async with dicomnet.connect(
            HOST, server.port, contexts=ECHO, tls=client_context(pki.ca)
        ) as association:
            ssl_object = association._stream._transport.get_extra_info("ssl_object")  # type: ignore[attr-defined]
            assert ssl_object.version() == "TLSv1.3"


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated")
async def test_tls11_peer_refused(pki: PKI, tls_log: HandshakeLog) -> None:
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    try:
        old.minimum_version = ssl.TLSVersion.TLSv1_1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:  # pragma: no cover - a Python without TLS 1.1 at all
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    async with tls_ae().serve(
        HOST, 0, tls=server_context(pki.server.cert, pki.server.key)
    ) as server:
        with pytest.raises(dicomnet.TLSError):
            await echo(server.port, old)
        await wait_for(lambda: len(tls_log.tls) == 1)
        assert await echo(server.port, client_context(pki.ca)) == 0


async def test_untrusted_server_refused(pki: PKI, tls_log: HandshakeLog) -> None:
    other = server_context(pki.other_server.cert, pki.other_server.key)
    async with tls_ae().serve(HOST, 0, tls=other) as server:
        with pytest.raises(dicomnet.TLSError, match="certificate verify failed") as caught:
            await echo(server.port, client_context(pki.ca))
        assert "unable to get local issuer certificate" in str(caught.value)
        await wait_for(lambda: len(tls_log.tls) == 1)
        assert "TLS handshake with 127.0.0.1" in tls_log.tls[0]
        assert await echo(server.port, client_context(pki.other_ca)) == 0  # still serving
    assert len(tls_log.tls) == 1 and tls_log.asyncio == []


async def test_expired_server_certificate_refused(pki: PKI) -> None:
    expired = server_context(pki.expired_server.cert, pki.expired_server.key)
    async with tls_ae().serve(HOST, 0, tls=expired) as server:
        with pytest.raises(dicomnet.TLSError, match="certificate has expired"):
            await echo(server.port, client_context(pki.ca))


async def test_host_name_checked_when_asked(pki: PKI) -> None:
    """The certificate names localhost and 127.0.0.1: reached as 127.0.0.2, it is refused
    when host names are checked, and accepted (chain verified) by default."""
    served = server_context(pki.server.cert, pki.server.key)
    async with tls_ae().serve(HOST, 0, tls=served) as server:
        assert await echo(server.port, client_context(pki.ca, check_hostname=True)) == 0
    async with tls_ae().serve("127.0.0.2", 0, tls=served) as server:
        checking = client_context(pki.ca, check_hostname=True)
        with pytest.raises(dicomnet.TLSError, match="IP address mismatch"):
            await echo_at("127.0.0.2", server.port, checking)
        assert await echo_at("127.0.0.2", server.port, client_context(pki.ca)) == 0


async def echo_at(host: str, port: int, tls: ssl.SSLContext) -> dicomnet.Status:
    async with dicomnet.connect(host, port, contexts=ECHO, tls=tls) as association:
        return await association.echo()


# --- client certificates (server with a CA) -----------------------------------------------


@pytest.fixture
def mutual(pki: PKI) -> ssl.SSLContext:
    return server_context(pki.server.cert, pki.server.key, ca=pki.ca)


async def test_client_certificate_accepted_and_seen(
    pki: PKI, mutual: ssl.SSLContext, tls_log: HandshakeLog
) -> None:
    ae = tls_ae()
    seen: list[dicomnet.AssociationRequest] = []

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        seen.append(request)

    async with ae.serve(HOST, 0, tls=mutual) as server:
        client = client_context(pki.ca, pki.client.cert, pki.client.key)
        async with dicomnet.connect(HOST, server.port, contexts=ECHO, tls=client) as association:
            assert await association.echo() == 0
            (accepted,) = server.associations
            assert subject_text(accepted.peer_certificate) == "CN=modality-1,O=Test Hospital,C=CH"
    (request,) = seen
    assert request.peer_certificate is not None
    assert ((("commonName", "modality-1"),)) in request.peer_certificate["subject"]
    assert request.peer_certificate_subject == "CN=modality-1,O=Test Hospital,C=CH"
    assert tls_log.tls == []


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
async def test_client_certificate_refused(
    pki: PKI, mutual: ssl.SSLContext, tls_log: HandshakeLog, who: str
) -> None:
    if who == "no certificate":
        client = client_context(pki.ca)
        logged = "presented no certificate"
    else:
        client = client_context(pki.ca, pki.other_client.cert, pki.other_client.key)
        logged = "client certificate verify failed"
    audited: list[Any] = []
    ae = tls_ae(audit=audited.append)
    admitted: list[object] = []

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        admitted.append(request)

    async with ae.serve(HOST, 0, tls=mutual) as server:
        with pytest.raises(dicomnet.TLSError, match="certificate") as caught:
            await echo(server.port, client)
        assert "TLS" in str(caught.value)
        await wait_for(lambda: len(tls_log.tls) == 1)
        assert logged in tls_log.tls[0], tls_log.tls
        alerts = [event for event in audited if event.kind == "security-alert"]
        assert len(alerts) == 1 and logged in alerts[0].detail, audited
        assert alerts[0].alert == "Node Authentication" and alerts[0].peer_host == HOST
        good = client_context(pki.ca, pki.client.cert, pki.client.key)
        assert await echo(server.port, good) == 0
    assert len(admitted) == 1  # only the good one reached on_association
    accepted = [event for event in audited if event.kind == "association-accepted"]
    assert accepted[0].certificate_subject == subject_text(admitted[0].peer_certificate)
    assert len(tls_log.tls) == 1 and tls_log.asyncio == []


# --- the wrong kind of peer ---------------------------------------------------------------


async def test_plain_requestor_to_tls_port(pki: PKI, tls_log: HandshakeLog) -> None:
    async with tls_ae().serve(
        HOST, 0, tls=server_context(pki.server.cert, pki.server.key)
    ) as server:
        with pytest.raises(dicomnet.AssociationAborted, match="does the peer expect TLS"):
            await echo(server.port, None)
        await wait_for(lambda: len(tls_log.tls) == 1)
        assert "wrong version number" in tls_log.tls[0]
        assert "plain DICOM connection to the TLS port" in tls_log.tls[0]
        assert await echo(server.port, client_context(pki.ca)) == 0
    assert len(tls_log.tls) == 1 and tls_log.asyncio == []


async def test_tls_requestor_to_plain_port(pki: PKI) -> None:
    async with tls_ae().serve(HOST, 0) as server:
        with pytest.raises(dicomnet.TLSError, match="is the peer using TLS"):
            await echo(server.port, client_context(pki.ca))
        assert await echo(server.port, None) == 0


async def test_tls_requestor_to_silent_plain_port(pki: PKI) -> None:
    """A peer that accepts TCP and never answers: the connect timeout covers the handshake."""
    with socket.create_server((HOST, 0)) as silent:
        port = silent.getsockname()[1]
        with pytest.raises(dicomnet.ConnectTimeout, match="TLS handshake"):
            await echo(port, client_context(pki.ca), connect_timeout=0.5)


def client_hello_half() -> bytes:
    """The first half of a real ClientHello."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_bio(incoming, outgoing)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    return hello[: len(hello) // 2]


@pytest.mark.parametrize("sent", ["nothing", "half a ClientHello"])
async def test_stalled_handshake_cut_at_artim(pki: PKI, tls_log: HandshakeLog, sent: str) -> None:
    ae = tls_ae(artim_timeout=0.5)
    tasks_before = len(asyncio.all_tasks())
    async with ae.serve(HOST, 0, tls=server_context(pki.server.cert, pki.server.key)) as server:
        stalled = socket.create_connection((HOST, server.port))
        stalled.settimeout(10)
        try:
            if sent != "nothing":
                stalled.sendall(client_hello_half())
            start = anyio.current_time()
            data = await anyio.to_thread.run_sync(stalled.recv, 100)
            elapsed = anyio.current_time() - start
        finally:
            stalled.close()
        assert data == b""  # closed by the server, not answered
        assert 0.3 < elapsed < 5.0
        await wait_for(lambda: len(tls_log.tls) == 1)
        assert "no handshake within 0.5 s" in tls_log.tls[0]
        assert await echo(server.port, client_context(pki.ca)) == 0
        await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before + 1)
    assert len(tls_log.tls) == 1 and tls_log.asyncio == []


async def test_closing_the_server_ends_pending_handshakes(pki: PKI) -> None:
    tasks_before = len(asyncio.all_tasks())
    stalled: socket.socket
    async with tls_ae().serve(
        HOST, 0, tls=server_context(pki.server.cert, pki.server.key)
    ) as server:
        stalled = socket.create_connection((HOST, server.port))
        await anyio.sleep(0.2)  # accepted; its handshake (30 s ARTIM) under way
        assert len(asyncio.all_tasks()) > tasks_before
    try:
        stalled.settimeout(5)
        assert await anyio.to_thread.run_sync(stalled.recv, 100) == b""
    finally:
        stalled.close()
    await wait_for(lambda: len(asyncio.all_tasks()) <= tasks_before)


# --- services that open associations of their own -----------------------------------------


async def test_ae_connect_uses_the_peer_tables_tls(pki: PKI) -> None:
    """`AE.connect` (storage commitment reports open theirs with it) goes over TLS to a
    TLS peer of the table, plain to others, and as told by an explicit `tls=`."""
    served = server_context(pki.server.cert, pki.server.key)
    async with tls_ae().serve(HOST, 0, tls=served) as secure, tls_ae().serve(HOST, 0) as plain:
        ae = dicomnet.AE(
            "PACS",
            peers={
                "SECURE": Peer(HOST, secure.port, tls=client_context(pki.ca)),
                "PLAIN": (HOST, plain.port),
            },
        )
        async with ae.connect(HOST, secure.port, aec="SECURE", contexts=ECHO) as association:
            assert await association.echo() == 0
            assert association.peer_certificate is not None
        async with ae.connect(HOST, plain.port, aec="PLAIN", contexts=ECHO) as association:
            assert await association.echo() == 0
            assert association.peer_certificate is None
        with pytest.raises(dicomnet.AssociationAborted, match="expect TLS"):
            async with ae.connect(HOST, secure.port, aec="OTHER", contexts=ECHO):
                pass
        explicit = client_context(pki.ca)
        async with ae.connect(HOST, secure.port, aec="OTHER", contexts=ECHO, tls=explicit) as a:
            assert await a.echo() == 0


def instances(count: int, folder: Path) -> list[Path]:
    source = dcmread(get_testdata_file("CT_small.dcm"))
    paths = []
    for i in range(count):
        source.SOPInstanceUID = generate_uid()
        path = folder / f"{i}.dcm"
        source.save_as(path)
        paths.append(path)
    return paths


def patient_query() -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = "PATIENT"
    query.PatientID = ""
    return query


async def test_move_to_a_tls_destination(pki: PKI, tmp_path: Path) -> None:
    """C-MOVE sub-operations go over TLS to a destination the peer table says uses it;
    the listener requires our client certificate."""
    paths = instances(3, tmp_path)
    listener_tls = server_context(pki.server.cert, pki.server.key, ca=pki.ca)
    async with dicomnet.retrieve_listener("ME", tls=listener_tls) as listener:
        to_listener = client_context(pki.ca, pki.client.cert, pki.client.key)
        ae = dicomnet.AE("PACS", peers={"ME": Peer(listener.host, listener.port, tls=to_listener)})

        @ae.on_move
        async def move(request: dicomnet.RetrieveRequest) -> AsyncIterator[Path]:
            for path in paths:
                yield path

        async with ae.serve(HOST, 0, tls=server_context(pki.server.cert, pki.server.key)) as server:
            contexts = [PresentationContext("1.2.840.10008.5.1.4.1.2.1.2")]
            async with dicomnet.connect(
                HOST, server.port, aet="ME", contexts=contexts, tls=client_context(pki.ca)
            ) as association:
                responses = association.retrieve(
                    patient_query(), model="patient", listener=listener
                )
                got = [instance.sop_instance_uid async for instance in responses]
    assert got == [str(dcmread(p).SOPInstanceUID) for p in paths]


async def test_move_to_a_tls_destination_without_tls_fails_cleanly(
    pki: PKI, tmp_path: Path, tls_log: HandshakeLog
) -> None:
    """The same destination listed as a plain peer: every sub-operation fails (0xA702),
    the C-MOVE is answered, and the listener logged the plain connection once."""
    paths = instances(2, tmp_path)
    listener_tls = server_context(pki.server.cert, pki.server.key)
    async with dicomnet.retrieve_listener("ME", tls=listener_tls) as listener:
        ae = dicomnet.AE("PACS", peers={"ME": (listener.host, listener.port)})

        @ae.on_move
        async def move(request: dicomnet.RetrieveRequest) -> AsyncIterator[Path]:
            for path in paths:
                yield path

        async with ae.serve(HOST, 0) as server:
            contexts = [PresentationContext("1.2.840.10008.5.1.4.1.2.1.2")]
            async with dicomnet.connect(HOST, server.port, aet="ME", contexts=contexts) as assoc:
                responses = assoc.move(patient_query(), destination="ME", model="patient")
                with pytest.raises(dicomnet.DimseError) as caught:
                    await responses.collect()
        assert caught.value.status == 0xA702
        await wait_for(lambda: len(tls_log.tls) == 1)
    assert "plain DICOM connection to the TLS port" in tls_log.tls[0]


async def test_commitment_report_to_a_tls_peer(pki: PKI, tmp_path: Path) -> None:
    """`serve`'s storage commitment SCP sends its report on a new association to the
    requestor's peer table entry, over TLS (the listener requires its certificate)."""
    from dicomnet.pacs.scp import StorageSCP

    (path,) = instances(1, tmp_path)
    stored = dcmread(path)
    listening = server_context(pki.client.cert, pki.client.key, ca=pki.ca)
    async with dicomnet.commitment_listener("MODALITY", HOST, 0, tls=listening) as ear:
        to_modality = client_context(pki.ca, pki.server.cert, pki.server.key)
        scp = StorageSCP(
            tmp_path / "storage",
            fsync=False,
            peers={"MODALITY": Peer(HOST, ear.port, tls=to_modality)},
        )
        try:
            served = server_context(pki.server.cert, pki.server.key)
            async with scp.serve(HOST, 0, tls=served) as server:
                async with dicomnet.connect(
                    HOST, server.port, aet="MODALITY", tls=client_context(pki.ca)
                ) as association:
                    assert await association.store(path) == 0
                    pending = await association.send_commitment_request([path], listener=ear)
                # Released: the report can only come on an association to the listener.
                with anyio.fail_after(20):
                    result = await pending.result(timeout=20)
                pending.close()
        finally:
            scp.close()
    assert result.committed == ((stored.SOPClassUID, stored.SOPInstanceUID),)
