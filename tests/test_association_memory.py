"""Associations on the in-memory network and its fake clock: no sockets, no sleeps.

Cancel, the DIMSE / ARTIM / idle timeouts, the asynchronous operations window with
two and more operations outstanding in both directions, release with work in flight,
an unrecognized command answered 0x0211, and N-EVENT-REPORTs reaching the requestor.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import anyio
import pytest
from pydicom.dataset import Dataset

import dicomnet
from dicomnet.proto.contexts import VERIFICATION, PresentationContext
from dicomnet.proto.dimse import CEchoRQ, UnrecognizedRQ, UnrecognizedRSP
from dicomnet.testing import FakeClock, MemoryNetwork

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(30)]

HOST, PORT = "pacs.test", 104
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
PRINTER = "1.2.840.10008.5.1.1.16"  # Printer SOP Class: a DIMSE-N class like any other
PRINTER_INSTANCE = "1.2.840.10008.5.1.1.17"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def net() -> MemoryNetwork:
    return MemoryNetwork(FakeClock(1000.0))


async def settle(condition: Callable[[], bool], steps: int = 2000) -> None:
    """Let the event loop run until `condition()` holds (bounded)."""
    for _ in range(steps):
        if condition():
            return
        await anyio.sleep(0)
    raise AssertionError("the condition never held")


async def pause(steps: int = 100) -> None:
    """Let the event loop run a while (nothing on the fake clock moves meanwhile)."""
    for _ in range(steps):
        await anyio.sleep(0)


async def test_echo_in_memory(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")
    async with ae.serve(HOST, PORT, backend=net) as server:
        async with dicomnet.connect(HOST, PORT, aec="PACS", backend=net) as assoc:
            assert await assoc.echo() == 0
            assert len(server.associations) == 1
    assert len(net.streams) == 1


async def test_a_missing_peer_is_refused(net: MemoryNetwork) -> None:
    with pytest.raises(dicomnet.ConnectionFailed):
        async with dicomnet.connect(HOST, PORT, backend=net):
            pass  # pragma: no cover


# --- timeouts on the fake clock --------------------------------------------------------------


async def test_dimse_timeout_on_the_fake_clock(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")
    answer = anyio.Event()

    @ae.on_echo
    async def echo(request: dicomnet.EchoRequest) -> int:
        await answer.wait()  # never answers
        return 0

    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, dimse_timeout=60.0, backend=net) as assoc:
            outcome: list[BaseException] = []

            async def call() -> None:
                try:
                    await assoc.echo()
                except dicomnet.DicomNetError as exc:
                    outcome.append(exc)

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await settle(lambda: bool(assoc.operations.invoked) and _sent(assoc))
                net.fake_clock.advance(59.0)
                await pause()
                assert not outcome  # not yet
                net.fake_clock.advance(1.0)
            assert isinstance(outcome[0], dicomnet.DimseTimeout)
            await assoc.wait_closed()
            assert "DIMSE" in assoc.outcome
        answer.set()


def _sent(assoc: dicomnet.Association) -> bool:
    return assoc.operations.get_timer() is not None


async def test_artim_timeout_when_the_peer_never_answers(net: MemoryNetwork) -> None:
    await net.listen(lambda stream: None, HOST, PORT)  # accepts, says nothing
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            async with dicomnet.connect(HOST, PORT, artim_timeout=30.0, backend=net):
                pass  # pragma: no cover
        except dicomnet.DicomNetError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        await settle(lambda: bool(net.streams) and net.streams[0][0].sent > 0)
        net.fake_clock.advance(29.5)
        await pause()
        assert not errors
        net.fake_clock.advance(0.5)
    assert isinstance(errors[0], dicomnet.ARTIMTimeout)


async def test_server_idle_timeout_on_the_fake_clock(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS", idle_timeout=10.0)
    async with ae.serve(HOST, PORT, backend=net) as server:
        async with dicomnet.connect(HOST, PORT, backend=net) as assoc:
            await settle(lambda: len(server.associations) == 1)
            net.fake_clock.advance(9.0)
            assert await assoc.echo() == 0  # activity: the idle time starts again
            net.fake_clock.advance(9.5)
            await pause()
            assert assoc.is_established
            net.fake_clock.advance(1.0)
            await assoc.wait_closed()
        assert "aborted" in assoc.outcome
        await settle(lambda: not server.associations)


# --- cancel ----------------------------------------------------------------------------------


async def test_cancel_stops_the_handler_and_the_association_goes_on(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")
    closed = anyio.Event()
    produced: list[int] = []

    @ae.on_find
    async def find(request: dicomnet.FindRequest) -> AsyncIterator[Dataset]:
        try:
            for number in range(1000):
                produced.append(number)
                match = Dataset()
                match.PatientID = str(number)
                yield match
        finally:
            closed.set()

    query = Dataset()
    query.PatientID = ""
    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, backend=net) as assoc:
            async with assoc.find(query, level="PATIENT") as responses:
                async for match in responses:
                    if match.PatientID == "2":
                        break
            assert responses.status == 0xFE00  # the final response: Cancel
            await closed.wait()
            assert len(produced) < 1000
            assert not assoc.operations.invoked
            assert await assoc.echo() == 0


# --- the asynchronous operations window ------------------------------------------------------


class Overlap:
    """A handler that counts how many of its calls run at once; with `together`, each
    waits until that many have started (so they must overlap, or the test hangs)."""

    def __init__(self, together: int = 0) -> None:
        self.running = 0
        self.most = 0
        self.calls = 0
        self._together = together
        self._all_in = anyio.Event()

    async def __call__(self, request: object) -> int:
        self.running += 1
        self.calls += 1
        self.most = max(self.most, self.running)
        if self.running == self._together:
            self._all_in.set()
        if self._together:
            await self._all_in.wait()
        else:
            await anyio.sleep(0)
        self.running -= 1
        return 0


async def test_window_of_three_both_ways(net: MemoryNetwork) -> None:
    """The requestor invokes three C-ECHOs at once and the acceptor performs them at
    once; then the acceptor invokes three N-EVENT-REPORTs at once on the requestor."""
    ae = dicomnet.AE("PACS", async_operations_window=(3, 3))
    echoes = ae.on_echo(Overlap(together=3))

    @ae.on_n_action(PRINTER)
    async def action(request: dicomnet.NRequest) -> int:
        association = request.association
        async with anyio.create_task_group() as tg:
            for event in (1, 2, 3):
                tg.start_soon(association.n_event_report, PRINTER, PRINTER_INSTANCE, event)
        return 0

    client = dicomnet.AE("SCU")
    reports = client.on_n_event_report(PRINTER)(Overlap(together=3))

    contexts = [PresentationContext(VERIFICATION), PresentationContext(PRINTER)]
    async with ae.serve(HOST, PORT, backend=net):
        async with client.connect(
            HOST, PORT, contexts=contexts, async_operations_window=(3, 3), backend=net
        ) as assoc:
            window = assoc.extended.async_operations_window
            assert (window.invoked, window.performed) == (3, 3)
            async with anyio.create_task_group() as tg:
                for _ in range(3):
                    tg.start_soon(assoc.echo)
            assert echoes.most == 3
            rsp = await assoc.n_action(PRINTER, PRINTER_INSTANCE, 1)
            assert rsp.status == 0
            assert reports.most == 3


async def test_window_of_one_serialises(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")  # answers (1, 1)
    echoes = ae.on_echo(Overlap())

    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, async_operations_window=(4, 4), backend=net) as a:
            window = a.extended.async_operations_window
            assert (window.invoked, window.performed) == (1, 1)
            async with anyio.create_task_group() as tg:
                for _ in range(5):
                    tg.start_soon(a.echo)
    assert echoes.most == 1 and echoes.calls == 5


async def test_a_peer_past_its_window_is_served_in_turn(net: MemoryNetwork) -> None:
    """Requests beyond the negotiated window wait for room; none is lost."""
    ae = dicomnet.AE("PACS")
    echoes = ae.on_echo(Overlap())

    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, backend=net) as assoc:
            context = assoc.context_for(VERIFICATION)
            assert context is not None
            for message_id in (101, 102, 103):  # three at once, though the window is 1
                await assoc.send_message(context.context_id, CEchoRQ(message_id))
            await settle(lambda: echoes.calls == 3 and not echoes.running)
    assert echoes.most == 1


# --- release with work in flight -------------------------------------------------------------


async def test_release_waits_for_the_requestors_own_operations(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")
    go = anyio.Event()

    @ae.on_echo
    async def echo(request: dicomnet.EchoRequest) -> int:
        await go.wait()
        return 0

    statuses: list[int] = []
    async with ae.serve(HOST, PORT, backend=net) as server:
        async with dicomnet.connect(HOST, PORT, backend=net) as assoc:

            async def call() -> None:
                statuses.append(await assoc.echo())

            async with anyio.create_task_group() as tg:
                tg.start_soon(call)
                await settle(lambda: _sent(assoc))
                tg.start_soon(assoc.release)
                await pause()
                assert assoc.is_established  # release waits for the C-ECHO
                go.set()
            assert assoc.outcome == "released"
        await settle(lambda: not server.associations)
    assert statuses == [0]


async def test_release_requested_with_a_request_in_flight_is_answered_after_it(
    net: MemoryNetwork,
) -> None:
    """The peer asks to release while its C-ECHO is performed: the C-ECHO-RSP goes out
    first, then the A-RELEASE-RP (PS3.8 §7.2)."""
    ae = dicomnet.AE("PACS")
    go = anyio.Event()
    done: list[str] = []

    @ae.on_echo
    async def echo(request: dicomnet.EchoRequest) -> int:
        await go.wait()
        done.append("echo")
        return 0

    async with ae.serve(HOST, PORT, backend=net) as server:
        async with dicomnet.connect(HOST, PORT, backend=net) as assoc:
            context = assoc.context_for(VERIFICATION)
            assert context is not None
            # Sent outside the operations core: release does not wait for its answer.
            await assoc.send_message(context.context_id, CEchoRQ(7))
            await settle(lambda: bool(server.associations))
            acceptor = next(iter(server.associations))
            await settle(lambda: bool(acceptor.operations.performing))
            async with anyio.create_task_group() as tg:
                tg.start_soon(assoc.release)
                await pause()
                assert not assoc.is_closed and not done  # A-RELEASE-RP waits for it
                go.set()
            assert done == ["echo"] and assoc.outcome == "released"


# --- what the peer sends that we do not know -------------------------------------------------


async def test_an_unrecognized_command_is_answered_0211(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")
    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, backend=net) as assoc:
            context = assoc.context_for(VERIFICATION)
            assert context is not None
            operation = await assoc.begin(context)
            await assoc.send_message(
                context.context_id, UnrecognizedRQ(0x0999, operation.message_id, VERIFICATION)
            )
            assoc.started(operation)
            response, _ = await assoc.next_response(operation)
            assert isinstance(response, UnrecognizedRSP)
            assert response.command_field == 0x8999 and response.status == 0x0211
            assert await assoc.echo() == 0  # the association goes on


async def test_n_requests_without_handlers_get_statuses_not_an_abort(net: MemoryNetwork) -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_n_get(PRINTER)
    async def get(request: dicomnet.NRequest) -> tuple[int, Dataset]:
        return 0, Dataset()

    contexts = [PresentationContext(PRINTER)]
    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, contexts=contexts, backend=net) as assoc:
            with pytest.raises(dicomnet.DimseError) as raised:
                await assoc.n_delete(PRINTER, PRINTER_INSTANCE)  # the class, not the operation
            assert raised.value.status == 0x0211
            assert raised.value.response.sop_instance_uid == PRINTER_INSTANCE
            rsp = await assoc.n_get(PRINTER, PRINTER_INSTANCE)
            assert rsp.status == 0


async def test_a_handler_that_raises_answers_0110_and_the_association_goes_on(
    net: MemoryNetwork,
) -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_n_set(PRINTER)
    async def set_(request: dicomnet.NRequest) -> int:
        raise RuntimeError("the printer caught fire")

    @ae.on_n_action(PRINTER)
    async def action(request: dicomnet.NRequest) -> int:
        raise dicomnet.DimseError(0x0112, "no such printer")

    contexts = [PresentationContext(PRINTER), PresentationContext(VERIFICATION)]
    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(HOST, PORT, contexts=contexts, backend=net) as assoc:
            with pytest.raises(dicomnet.DimseError) as raised:
                await assoc.n_set(PRINTER, PRINTER_INSTANCE, Dataset())
            assert raised.value.status == 0x0110
            assert "caught fire" in (raised.value.error_comment or "")
            with pytest.raises(dicomnet.DimseError) as raised:
                await assoc.n_action(PRINTER, PRINTER_INSTANCE, 1)
            assert raised.value.status == 0x0112
            assert raised.value.error_comment == "no such printer"
            assert await assoc.echo() == 0


async def test_n_event_report_reaches_the_requestors_handler(net: MemoryNetwork) -> None:
    """An N-EVENT-REPORT on an association we requested (how a storage commitment
    report comes on the same association) goes to `connect(handlers=...)`."""
    ae = dicomnet.AE("PACS")

    @ae.on_n_action(PRINTER)
    async def action(request: dicomnet.NRequest) -> int:
        info = Dataset()
        info.PrinterStatusInfo = "READY"
        await request.association.n_event_report(PRINTER, PRINTER_INSTANCE, 1, info)
        return 0

    client = dicomnet.AE("SCU")
    reports: list[tuple[int | None, str, str]] = []

    @client.on_n_event_report(PRINTER)
    async def report(request: dicomnet.NRequest) -> int:
        assert request.dataset is not None
        reports.append(
            (request.event_type, request.sop_instance_uid, request.dataset.PrinterStatusInfo)
        )
        return 0

    contexts = [PresentationContext(PRINTER)]
    async with ae.serve(HOST, PORT, backend=net):
        async with dicomnet.connect(
            HOST, PORT, contexts=contexts, handlers=client.handlers, backend=net
        ) as assoc:
            await assoc.n_action(PRINTER, PRINTER_INSTANCE, 1)
    assert reports == [(1, PRINTER_INSTANCE, "READY")]
