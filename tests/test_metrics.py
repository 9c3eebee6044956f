"""Observers and Prometheus metrics (dicomnet.observe, dicomnet.metrics, serve
--metrics-port): what is counted of associations and operations, on both sides, and the
exporter of `dicomnet serve` scraped over HTTP."""

from __future__ import annotations

import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom.data import get_testdata_file

import dicomnet
from dicomnet.metrics import PrometheusObserver
from dicomnet.observe import ObservedAssociation, ObservedOperation, Observer
from dicomnet.proto.contexts import VERIFICATION, PresentationContext
from tests import peers

pytestmark = pytest.mark.timeout(60)

CT = "1.2.840.10008.5.1.4.1.1.2"
CT_FILE = Path(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder(Observer):
    """Every event, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def association_opened(self, association: ObservedAssociation) -> None:
        self.events.append(("opened", association))

    def association_closed(self, association: ObservedAssociation) -> None:
        self.events.append(("closed", association))

    def operation_started(self, operation: ObservedOperation) -> None:
        self.events.append(("started", operation))

    def operation_finished(self, operation: ObservedOperation) -> None:
        self.events.append(("finished", operation))

    def finished(self) -> list[ObservedOperation]:
        return [record for kind, record in self.events if kind == "finished"]


def dataset_length(path: Path) -> int:
    """Bytes of a Part-10 file's data set (what a C-STORE carries)."""
    return path.stat().st_size - peers.split_part10(path)[1]


def value(observer: PrometheusObserver, name: str, **labels: str) -> float:
    found = observer.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


@pytest.mark.anyio
async def test_echoes_and_stores_are_counted_on_both_sides() -> None:
    metrics = PrometheusObserver()
    ae = dicomnet.AE("PACS", observer=metrics)
    stores = 0

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        nonlocal stores
        stores += 1
        return 0xA700 if stores == 2 else 0x0000  # the second: out of resources

    client = Recorder()
    contexts = [PresentationContext(VERIFICATION), PresentationContext(CT)]
    active = []
    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect(
                "127.0.0.1", server.port, aec="PACS", contexts=contexts, observer=client
            ) as assoc:
                for _ in range(5):
                    assert await assoc.echo() == 0
                active.append(value(metrics, "dicomnet_associations_active", role="acceptor"))
                await assoc.store(CT_FILE)
                with pytest.raises(dicomnet.DimseError):
                    await assoc.store(CT_FILE)
                await assoc.store(CT_FILE)
            while value(metrics, "dicomnet_associations_active", role="acceptor") != 0:
                await anyio.sleep(0.01)
            active.append(0.0)
    assert active == [1.0, 0.0]

    def ops(command: str, category: str, status: str, role: str = "SCP") -> float:
        labels = {"command": command, "role": role, "category": category, "status": status}
        labels["service"] = "echo" if command == "C-ECHO" else "store"
        return value(metrics, "dicomnet_operations_total", **labels)

    assert ops("C-ECHO", "success", "0x0000") == 5
    assert ops("C-STORE", "success", "0x0000") == 2
    assert ops("C-STORE", "failure", "0xA700") == 1
    size = dataset_length(CT_FILE)
    assert value(metrics, "dicomnet_received_bytes_total", command="C-STORE", role="SCP") == (
        3 * size
    )
    assert value(metrics, "dicomnet_received_bytes_total", command="C-ECHO", role="SCP") == 0
    latency = "dicomnet_operation_duration_seconds_count"
    assert value(metrics, latency, command="C-ECHO", role="SCP") == 5
    assert value(metrics, latency, command="C-STORE", role="SCP") == 3
    assert value(metrics, "dicomnet_operations_in_progress", command="C-STORE", role="SCP") == 0
    released = {"role": "acceptor", "outcome": "released"}
    assert value(metrics, "dicomnet_associations_total", **released) == 1

    # The requestor's side, through the observer interface itself.
    kinds = [kind for kind, _ in client.events]
    assert kinds == ["opened", *["started", "finished"] * 8, "closed"]
    opened = client.events[0][1]
    assert (opened.role, opened.peer_ae_title) == ("requestor", "PACS")
    assert (opened.peer_host, opened.peer_port) == ("127.0.0.1", server.port)
    closed = client.events[-1][1]
    assert closed.outcome == "released" and closed.duration > 0
    finished = client.finished()
    assert [op.command for op in finished] == ["C-ECHO"] * 5 + ["C-STORE"] * 3
    assert {op.role for op in finished} == {"SCU"}
    assert [op.status for op in finished[5:]] == [0x0000, 0xA700, 0x0000]
    assert [op.bytes_out for op in finished[5:]] == [size] * 3
    assert all(op.bytes_in == 0 and op.duration > 0 for op in finished)
    assert [op.message_id for op in finished] == list(range(1, 9))
    assert finished[5].sop_class_uid == CT


@pytest.mark.anyio
async def test_rejections_and_aborts_are_counted() -> None:
    metrics = PrometheusObserver()
    ae = dicomnet.AE("PACS", observer=metrics, allowed_calling_ae_titles=["FRIEND"])
    client = Recorder()
    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            with pytest.raises(dicomnet.AssociationRejected):
                async with dicomnet.connect(
                    "127.0.0.1", server.port, aet="STRANGER", observer=client
                ):
                    pass
            async with dicomnet.connect("127.0.0.1", server.port, aet="FRIEND") as assoc:
                await assoc.abort()
            while value(metrics, "dicomnet_associations_active", role="acceptor") != 0:
                await anyio.sleep(0.01)
    rejected = {"role": "acceptor", "result": "1", "source": "1", "reason": "3"}
    assert value(metrics, "dicomnet_associations_rejected_total", **rejected) == 1
    for outcome in ("rejected", "aborted"):
        labels = {"role": "acceptor", "outcome": outcome}
        assert value(metrics, "dicomnet_associations_total", **labels) == 1
    # The requestor is told of its rejection alone: no association was opened.
    assert [kind for kind, _ in client.events] == ["closed"]
    record = client.events[0][1]
    assert (record.outcome, record.rejection, record.role) == ("rejected", (1, 1, 3), "requestor")


@pytest.mark.anyio
async def test_a_failing_observer_stops_nothing(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Observer):
        def operation_finished(self, operation: ObservedOperation) -> None:
            raise RuntimeError("observer bug")

    ae = dicomnet.AE("PACS", observer=Broken())
    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect("127.0.0.1", server.port, observer=Broken()) as assoc:
                assert await assoc.echo() == 0
                assert await assoc.echo() == 0
    assert "observer operation_finished failed" in caplog.text


@pytest.mark.anyio
async def test_an_operation_cut_short_has_no_status() -> None:
    ae = dicomnet.AE("PACS")
    entered = anyio.Event()

    @ae.on_echo
    async def echo(request: dicomnet.EchoRequest) -> int:
        entered.set()
        await anyio.sleep(30)
        return 0

    client = Recorder()
    errors: list[Exception] = []

    async def echo_aborted(assoc: dicomnet.Association) -> None:
        try:
            await assoc.echo()
        except dicomnet.AssociationAborted as exc:
            errors.append(exc)

    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect("127.0.0.1", server.port, observer=client) as assoc:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(echo_aborted, assoc)
                    await entered.wait()
                    await assoc.abort()
    assert len(errors) == 1
    (operation,) = client.finished()
    assert operation.command == "C-ECHO" and operation.status is None
    assert client.events[-1][1].outcome == "aborted"


@pytest.mark.anyio
async def test_an_aes_own_associations_are_observed_too() -> None:
    """C-MOVE: the C-STOREs the SCP sends to the destination are its SCU operations."""
    from pydicom.dataset import Dataset

    destination = dicomnet.AE("DEST")

    @destination.on_store
    async def keep(request: dicomnet.StoreRequest) -> int:
        return 0

    metrics = PrometheusObserver()
    pacs = dicomnet.AE("PACS", observer=metrics)

    @pacs.on_move
    async def move(request: dicomnet.RetrieveRequest):  # type: ignore[no-untyped-def]
        yield CT_FILE

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = "1.2.3"
    with anyio.fail_after(30):
        async with destination.serve("127.0.0.1", 0) as dest, pacs.serve("127.0.0.1", 0) as server:
            pacs.peers["DEST"] = ("127.0.0.1", dest.port)
            async with dicomnet.connect("127.0.0.1", server.port) as assoc:
                progress = [p async for p in assoc.move(query, destination="DEST")]
            assert progress[-1].completed == 1
            while value(metrics, "dicomnet_associations_active", role="acceptor") != 0:
                await anyio.sleep(0.01)
    success = {"category": "success", "status": "0x0000"}
    moved = {"service": "move", "command": "C-MOVE", "role": "SCP", **success}
    stored = {"service": "store", "command": "C-STORE", "role": "SCU", **success}
    assert value(metrics, "dicomnet_operations_total", **moved) == 1
    assert value(metrics, "dicomnet_operations_total", **stored) == 1
    sent = value(metrics, "dicomnet_sent_bytes_total", command="C-STORE", role="SCU")
    assert sent == dataset_length(CT_FILE)
    for role in ("acceptor", "requestor"):
        labels = {"role": role, "outcome": "released"}
        assert value(metrics, "dicomnet_associations_total", **labels) == 1


# --- dicomnet serve --metrics-port ----------------------------------------------------------


def test_serve_exports_what_it_did(dicomnet_server: Any, tmp_path: Path) -> None:
    metrics_port = peers.free_port()
    server = dicomnet_server(extra_args=["--metrics-port", str(metrics_port)])
    before = peers.scrape_metrics(metrics_port)
    assert (
        peers.metric_sample(
            before, "dicomnet_associations_total", role="acceptor", outcome="released"
        )
        == 0
    )
    echo = peers.run_dicomnet(["echo", "127.0.0.1", server.port, "--count", "4"], timeout=60)
    assert echo.returncode == 0, peers.describe_cli(echo)
    store = peers.run_dicomnet(["store", "127.0.0.1", server.port, CT_FILE], timeout=60)
    assert store.returncode == 0, peers.describe_cli(store)
    samples = peers.scrape_metrics(metrics_port)

    def ops(command: str, service: str) -> float:
        return peers.metric_sample(
            samples,
            "dicomnet_operations_total",
            service=service,
            command=command,
            role="SCP",
            category="success",
            status="0x0000",
        )

    assert ops("C-ECHO", "echo") == 4
    assert ops("C-STORE", "store") == 1
    received = peers.metric_sample(
        samples, "dicomnet_received_bytes_total", command="C-STORE", role="SCP"
    )
    assert received == dataset_length(CT_FILE)
    released = peers.metric_sample(
        samples, "dicomnet_associations_total", role="acceptor", outcome="released"
    )
    assert released == 2
    assert peers.metric_sample(samples, "dicomnet_associations_active", role="acceptor") == 0
    latency = "dicomnet_operation_duration_seconds_count"
    assert peers.metric_sample(samples, latency, command="C-ECHO", role="SCP") == 4
    assert server.stop() == 0
    # The exporter stopped with serve.
    with pytest.raises(urllib.error.URLError):
        peers.scrape_metrics(metrics_port)


def test_serve_refuses_a_metrics_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = ["serve", "--port", peers.free_port(), "--storage", tmp_path / "s"]
        result = peers.run_dicomnet([*argv, "--metrics-port", port], timeout=60)
    assert result.returncode == 1, peers.describe_cli(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, peers.describe_cli(result)
    assert f"cannot serve metrics on 127.0.0.1:{port}" in lines[0]
    assert "listening" not in result.stdout


def test_metrics_without_prometheus_client_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnet.cli import exporter

    monkeypatch.setitem(sys.modules, "prometheus_client", None)
    monkeypatch.delitem(sys.modules, "dicomnet.metrics", raising=False)
    args = type("Args", (), {"metrics_port": 9464})()
    with pytest.raises(SystemExit) as exit_info:
        exporter.metrics_observer(args, "route")  # type: ignore[arg-type]
    message = str(exit_info.value.code)
    assert message.startswith("dicomnet route: --metrics-port needs")
    assert "prometheus_client" in message and "dicomnet[metrics]" in message
    assert "\n" not in message
