"""`dicomnet route` over TLS on both sides, between DCMTK peers: storescu `+tls` with a
client certificate sends to the router, which listens with TLS and requires client
certificates (`tls_ca`), and forwards over TLS (`tls = true`) to storescp `+tls`.

The two sides use different CAs: the router's certificate and storescu's are issued by
`pki.ca` (the router's `tls_ca`), storescp's by `pki.other_ca` (the destination's
`tls_ca`), so each trust setting is checked on its own.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peers import (
    HOST,
    REPO_ROOT,
    ManagedProcess,
    StoreSCP,
    ToolResult,
    dataset_bytes,
    dicomnet_command,
    dicomnet_env,
    start_listening_process,
    storescu,
    wait_until,
)
from pydicom import dcmread
from test_route_interop import instances
from tls_certs import PKI, KeyPair, make_pki

pytestmark = pytest.mark.dcmtk


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return make_pki(tmp_path / "pki")


def dcmtk_tls(pair: KeyPair, ca: Path) -> list[str]:
    """DCMTK's `+tls KEY CERT` (PEM) trusting `ca`."""
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(ca)]


@pytest.fixture
def tls_route(
    tmp_path: Path, pki: PKI, request: pytest.FixtureRequest
) -> Iterator[Callable[[StoreSCP], tuple[ManagedProcess, int]]]:
    """Factory: `dicomnet route` listening with TLS (pki.server, client certificates of
    pki.ca required) and forwarding everything over TLS to a storescp (trusting
    pki.other_ca); stopped at teardown, its log printed when the test failed."""
    started: list[ManagedProcess] = []
    workdir = tmp_path / "route"

    def start(destination: StoreSCP) -> tuple[ManagedProcess, int]:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "route.toml"

        def argv(port: int) -> list[str]:
            config.write_text(
                f'[listen]\nhost = "{HOST}"\nport = {port}\naet = "ROUTER"\n'
                f'tls_cert = "{pki.server.cert}"\ntls_key = "{pki.server.key}"\n'
                f'tls_ca = "{pki.ca}"\n\n'
                f'[queue]\nfolder = "{workdir / "queue"}"\n\n'
                f'[[destination]]\nname = "dcmtk"\naet = "{destination.aet}"\n'
                f'host = "{HOST}"\nport = {destination.port}\ntls = true\n'
                f'tls_ca = "{pki.other_ca}"\nassociations = 2\nbackoff = 0.2\n'
                f"max_backoff = 1.0\n\n"
                f'[[rule]]\nforward = ["dcmtk"]\n'
            )
            return [*dicomnet_command(), "route", "--config", str(config), "-v"]

        process, port = start_listening_process(
            "dicomnet route",
            argv,
            workdir / "route.log",
            env=dicomnet_env(workdir / "tmp"),
            cwd=REPO_ROOT,
        )
        started.append(process)
        return process, port

    yield start
    failed = any(
        getattr(getattr(request.node, f"rep_{when}", None), "failed", False)
        for when in ("setup", "call")
    )
    for process in started:
        code = process.stop()
        if failed:
            print(f"--- dicomnet route log (exit {code}) ---")
            print(process.log_text())


def send_at_once(port: int, batches: list[list[Path]], tls: list[str]) -> list[ToolResult]:
    """One storescu per batch, all at the same time, with the TLS options `tls`."""
    results: list[ToolResult] = []

    def send(batch: list[Path]) -> None:
        results.append(storescu(port, batch, aec="ROUTER", extra_args=tls))

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(150)
    assert len(results) == len(batches)
    return results


def handshake_failures(route: ManagedProcess) -> list[str]:
    return [line for line in route.log_text(None).splitlines() if "TLS handshake" in line]


@pytest.mark.timeout(240)
def test_storescu_tls_to_route_tls_to_storescp_tls_byte_identical_and_refusals(
    tmp_path: Path,
    pki: PKI,
    storescp: Callable[..., StoreSCP],
    tls_route: Callable[[StoreSCP], tuple[ManagedProcess, int]],
) -> None:
    """Every instance arrives once, byte-identical; a storescu with no client certificate,
    with one from another CA, or without TLS is refused, and the router keeps serving."""
    cts = instances(tmp_path / "in", "CT_small.dcm", 6)
    mrs = instances(tmp_path / "in", "MR_small.dcm", 6)
    refused = instances(tmp_path / "refused", "CT_small.dcm", 3)
    later = instances(tmp_path / "later", "MR_small.dcm", 2)
    # storescp +B (data set bytes as received), +uf (a second copy would be another
    # file), and it requires a client certificate (DCMTK's default, -rc): the router
    # presents its own, [listen]'s, as no tls_cert is given for the destination.
    dcmtk = storescp(aet="STORESCP", extra_args=[*dcmtk_tls(pki.other_server, pki.ca), "+uf"])
    router, port = tls_route(dcmtk)
    good = dcmtk_tls(pki.client, pki.ca)

    for result in send_at_once(port, [cts[:3] + mrs[:3], cts[3:] + mrs[3:]], good):
        assert result.returncode == 0, result
        assert result.output.count("Received Store Response") == 6, result

    no_certificate = storescu(
        port, refused[:1], aec="ROUTER", extra_args=["+tla", "+cf", str(pki.ca)]
    )
    other_ca = storescu(
        port, refused[1:2], aec="ROUTER", extra_args=dcmtk_tls(pki.other_client, pki.ca)
    )
    plain = storescu(port, refused[2:], aec="ROUTER")
    for result in (no_certificate, other_ca, plain):
        assert result.returncode != 0, result
        assert "Association Accepted" not in result.output, result
        assert "Store Response" not in result.output, result
    assert wait_until(lambda: len(handshake_failures(router)) == 3, 10), router.log_text()
    reasons = "\n".join(handshake_failures(router))
    for why in ("presented no certificate", "certificate verify failed", "plain DICOM"):
        assert why in reasons, reasons
    assert router.alive(), router.log_text()

    (result,) = send_at_once(port, [later], good)
    assert result.returncode == 0, result
    assert result.output.count("Received Store Response") == 2, result

    sent = cts + mrs + later
    uid = {p: str(dcmread(p).SOPInstanceUID) for p in sent}
    received = dcmtk.wait_received(len(sent), timeout=60)
    pending = tmp_path / "route" / "queue" / "dcmtk" / "pending"
    assert wait_until(lambda: not list(pending.glob("*.dcm")), 30), router.log_text()
    assert set(received) == {uid[p] for p in sent}, router.log_text()
    files = [p for p in dcmtk.out_dir.rglob("*") if p.is_file()]
    assert len(files) == len(sent)  # each exactly once
    for p in sent:
        assert dataset_bytes(received[uid[p]]) == dataset_bytes(p), p
    assert router.alive(), router.log_text()
    text = router.log_text(None)
    assert "Traceback" not in text, text
