"""C-FIND, C-MOVE, C-GET and C-CANCEL through the Python API, both sides in-process."""

from __future__ import annotations

import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.proto.contexts import VERIFICATION, PresentationContext

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

FILES = [get_testdata_file(n) for n in ("CT_small.dcm", "MR_small.dcm", "rtplan.dcm")]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def query(level: str = "PATIENT", **keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    ds.PatientID = ""
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def match(i: int) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "PATIENT"
    ds.PatientID = f"P{i:07d}"
    return ds


class Counter:
    def __init__(self) -> None:
        self.yielded = 0
        self.closed = anyio.Event()


def finder(ae: dicomnet.AE, total: int, counter: Counter) -> None:
    @ae.on_find
    async def find(request: dicomnet.FindRequest) -> AsyncIterator[Dataset]:
        try:
            for i in range(total):
                counter.yielded += 1
                yield match(i)
        finally:
            counter.closed.set()


async def test_find_streams_every_match_with_final_status() -> None:
    ae = dicomnet.AE("PACS")
    counter = Counter()
    finder(ae, 2_500, counter)
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            responses = assoc.find(query(), model="patient")
            ids = [ds.PatientID async for ds in responses]
    assert ids == [f"P{i:07d}" for i in range(2500)]
    assert responses.status == 0x0000 and responses.status.is_success


async def test_leaving_find_early_cancels_and_association_goes_on() -> None:
    ae = dicomnet.AE("PACS")
    counter = Counter()
    finder(ae, 1_000_000, counter)
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            with anyio.fail_after(10):
                async with assoc.find(query(), model="patient") as responses:
                    seen = 0
                    async for _ in responses:
                        seen += 1
                        if seen == 3:
                            break
                assert responses.status is not None and responses.status.is_cancel
                await counter.closed.wait()
                assert counter.yielded < 1_000_000
                assert await assoc.echo() == 0


async def test_break_without_async_with_still_cancels_before_next_request() -> None:
    ae = dicomnet.AE("PACS")
    counter = Counter()
    finder(ae, 5_000, counter)
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            with anyio.fail_after(10):
                async for _ in assoc.find(query(), model="patient"):
                    break
                # The window is 1: the echo waits until the find is over (cancelled).
                assert await assoc.echo() == 0
                assert counter.closed.is_set()
            counter.closed = anyio.Event()
            with anyio.fail_after(30):
                again = await assoc.find(query(), model="patient").collect()
                assert len(again) == 5_000 and counter.closed.is_set()


async def test_slow_consumer_pauses_the_server_handler() -> None:
    """Backpressure: a consumer that stops reading stops the server's handler once the
    socket buffers are full; memory stays bounded however many matches there are."""
    ae = dicomnet.AE("PACS")
    counter = Counter()

    @ae.on_find
    async def find(request: dicomnet.FindRequest) -> AsyncIterator[Dataset]:
        try:
            for i in range(1_000_000):
                counter.yielded += 1
                ds = match(i)
                ds.add_new(0x00091010, "OB", b"x" * 65536)  # big answers fill buffers fast
                yield ds
        finally:
            counter.closed.set()

    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            async with assoc.find(query(), model="patient") as responses:
                async for _ in responses:
                    previous = -1
                    with anyio.fail_after(30):
                        while counter.yielded != previous:
                            previous = counter.yielded
                            await anyio.sleep(0.5)
                    # Stable for 0.5 s while nothing is consumed, far below the total.
                    assert counter.yielded < 5_000
                    break
            assert responses.status is not None and responses.status.is_cancel
            assert counter.closed.is_set()


async def test_find_warnings_and_handler_failure() -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_find
    async def find(request: dicomnet.FindRequest) -> AsyncIterator[object]:
        if request.identifier.get("PatientID") == "FAIL":
            raise RuntimeError("index unavailable")
        yield match(1), 0xFF01
        yield match(2)

    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            responses = assoc.find(query(), model="study")
            assert len(await responses.collect()) == 2
            assert responses.warnings == [0xFF01]
            with pytest.raises(dicomnet.DimseError) as info:
                await assoc.find(query(PatientID="FAIL"), model="study").collect()
            assert info.value.status.is_failure
            assert "index unavailable" in (info.value.error_comment or "")
            assert await assoc.echo() == 0


async def test_find_not_negotiated_is_a_clear_error() -> None:
    ae = dicomnet.AE("PACS")
    async with ae.serve("127.0.0.1", 0) as server:
        contexts = [PresentationContext(VERIFICATION)]
        async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts) as assoc:
            with pytest.raises(dicomnet.NotNegotiatedError, match="C-FIND"):
                await assoc.find(query(), model="patient").collect()


def instances(count: int, folder: Path) -> list[Path]:
    source = dcmread(FILES[0])
    paths = []
    for i in range(count):
        source.SOPInstanceUID = generate_uid()
        path = folder / f"{i}.dcm"
        source.save_as(path)
        paths.append(path)
    return paths


def archive(received: list[str]) -> dicomnet.AE:
    ae = dicomnet.AE("DEST")

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        received.append(request.sop_instance_uid)
        assert request.move_originator_ae_title == "DICOMNET"
        assert request.move_originator_message_id is not None
        return 0

    return ae


def mover(ae: dicomnet.AE, paths: list[Path], counter: Counter) -> None:
    @ae.on_move
    async def move(request: dicomnet.RetrieveRequest) -> AsyncIterator[Path]:
        try:
            for path in paths:
                counter.yielded += 1
                yield path
        finally:
            counter.closed.set()


async def test_move_sends_to_destination_with_counts(tmp_path: Path) -> None:
    received: list[str] = []
    paths = instances(12, tmp_path)
    counter = Counter()
    async with archive(received).serve("127.0.0.1", 0) as dest:
        ae = dicomnet.AE("PACS", peers={"DEST": ("127.0.0.1", dest.port)})
        mover(ae, paths, counter)
        async with ae.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect("127.0.0.1", server.port) as assoc:
                responses = assoc.move(query(), destination="DEST", model="patient")
                progress = await responses.collect()
    assert len(received) == 12
    assert [p.remaining for p in progress[:-1]] == list(range(11, 0, -1))
    final = progress[-1]
    assert final.is_final and final.status == 0 and final.completed == 12 and final.failed == 0
    assert responses.status == 0


async def test_leaving_move_early_cancels(tmp_path: Path) -> None:
    received: list[str] = []
    paths = instances(300, tmp_path)
    counter = Counter()
    async with archive(received).serve("127.0.0.1", 0) as dest:
        ae = dicomnet.AE("PACS", peers={"DEST": ("127.0.0.1", dest.port)})
        mover(ae, paths, counter)
        async with ae.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect("127.0.0.1", server.port) as assoc:
                with anyio.fail_after(20):
                    async with assoc.move(query(), destination="DEST", model="patient") as rsp:
                        async for progress in rsp:
                            if progress.completed and progress.completed >= 3:
                                break
                    assert rsp.status is not None and rsp.status.is_cancel
                    assert counter.closed.is_set()
                    assert await assoc.echo() == 0
    assert 3 <= len(received) < 300


async def test_move_to_unknown_or_down_destination(tmp_path: Path) -> None:
    paths = instances(4, tmp_path)
    with anyio.fail_after(20):
        # A port nobody listens on: bind, note it, close.
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        dead_port = listener.extra(anyio.abc.SocketAttribute.local_port)
        await listener.aclose()
        ae = dicomnet.AE("PACS", peers={"DOWN": ("127.0.0.1", dead_port)})
        mover(ae, paths, Counter())
        async with ae.serve("127.0.0.1", 0) as server:
            async with dicomnet.connect("127.0.0.1", server.port) as assoc:
                with pytest.raises(dicomnet.DimseError) as info:
                    await assoc.move(query(), destination="NOBODY", model="patient").collect()
                assert info.value.status == 0xA801
                with pytest.raises(dicomnet.DimseError) as info:
                    await assoc.move(query(), destination="DOWN", model="patient").collect()
                assert info.value.status == 0xA702
                progress = info.value.progress  # type: ignore[attr-defined]
                assert progress.failed == 4 and progress.completed == 0
                assert len(progress.failed_sop_instance_uids) == 4
                assert await assoc.echo() == 0


async def test_get_yields_instances_and_counts_refusals(tmp_path: Path) -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_get
    async def get(request: dicomnet.RetrieveRequest) -> AsyncIterator[str]:
        for path in FILES:
            yield path

    out = tmp_path / "out"
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            responses = assoc.get(query(), model="patient")
            uids = []
            async for instance in responses:
                uids.append(instance.sop_instance_uid)
                if len(uids) == 2:
                    instance.status = 0xA700  # refuse this one
                else:
                    await instance.save(out / f"{instance.sop_instance_uid}.dcm")
    expected = [str(dcmread(f).SOPInstanceUID) for f in FILES]
    assert uids == expected
    assert sorted(p.stem for p in out.iterdir()) == sorted([expected[0], expected[2]])
    assert responses.status == 0xB000
    assert responses.progress is not None
    assert (responses.progress.completed, responses.progress.failed) == (2, 1)
    assert responses.progress.failed_sop_instance_uids == (expected[1],)


async def test_get_without_storage_role_fails_sub_operations() -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_get
    async def get(request: dicomnet.RetrieveRequest) -> AsyncIterator[str]:
        yield FILES[0]

    contexts = [
        PresentationContext("1.2.840.10008.5.1.4.1.2.1.3"),
        PresentationContext(VERIFICATION),
    ]
    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port, contexts=contexts) as assoc:
            with pytest.raises(dicomnet.DimseError) as info:
                await assoc.get(query(), model="patient").collect()
            assert info.value.status == 0xA702
            assert info.value.progress.failed == 1  # type: ignore[attr-defined]
            assert await assoc.echo() == 0


async def test_retrieve_by_move_to_own_listener(tmp_path: Path) -> None:
    """Retrieve to self: C-MOVE to a listener of ours, instances matched to the move."""
    paths = instances(5, tmp_path)
    async with dicomnet.retrieve_listener("ME") as listener:
        ae = dicomnet.AE("PACS", peers={"ME": (listener.host, listener.port)})
        mover(ae, paths, Counter())
        async with ae.serve("127.0.0.1", 0) as server:
            contexts = [PresentationContext("1.2.840.10008.5.1.4.1.2.1.2")]
            async with dicomnet.connect(
                "127.0.0.1", server.port, aet="ME", contexts=contexts
            ) as assoc:
                with pytest.raises(dicomnet.NotNegotiatedError):
                    assoc.retrieve(query(), model="patient")
                responses = assoc.retrieve(query(), model="patient", listener=listener)
                got = [instance.sop_instance_uid async for instance in responses]
    assert got == [str(dcmread(p).SOPInstanceUID) for p in paths]
    assert responses.status == 0
    assert responses.progress is not None and responses.progress.completed == 5


async def test_retrieve_prefers_get_when_accepted() -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_get
    async def get(request: dicomnet.RetrieveRequest) -> AsyncIterator[str]:
        yield FILES[1]

    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            got = [i.sop_instance_uid async for i in assoc.retrieve(query(), model="patient")]
    assert got == [str(dcmread(FILES[1]).SOPInstanceUID)]


async def test_a_match_that_cannot_be_encoded_fails_the_find() -> None:
    ae = dicomnet.AE("PACS")
    counter = Counter()

    @ae.on_find
    async def find(request: dicomnet.FindRequest) -> AsyncIterator[object]:
        try:
            yield match(1)
            bad = Dataset()
            bad.PatientID = "X"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                bad.add_new(0x00280010, "US", "abc")  # Rows: cannot be encoded
            yield bad
            while True:
                counter.yielded += 1
                yield match(2)
        finally:
            counter.closed.set()

    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            responses = assoc.find(query(), model="patient")
            got = []
            with pytest.raises(dicomnet.DimseError) as info:
                async for ds in responses:
                    got.append(ds.PatientID)
            assert got == ["P0000001"]
            assert info.value.status.is_failure
            with anyio.fail_after(10):
                await counter.closed.wait()
            assert await assoc.echo() == 0


async def test_cancel_reaches_a_handler_waiting_between_matches() -> None:
    ae = dicomnet.AE("PACS")
    counter = Counter()

    @ae.on_find
    async def find(request: dicomnet.FindRequest) -> AsyncIterator[Dataset]:
        try:
            for i in range(3):
                yield match(i)
            await anyio.sleep_forever()  # a slow index
            yield match(99)
        finally:
            counter.closed.set()

    async with ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.connect("127.0.0.1", server.port) as assoc:
            with anyio.fail_after(10):
                async with assoc.find(query(), model="patient") as responses:
                    ids = []
                    async for ds in responses:
                        ids.append(ds.PatientID)
                        if len(ids) == 3:
                            break
            assert ids == [f"P{i:07d}" for i in range(3)]
            assert responses.status is not None and responses.status.is_cancel
            assert counter.closed.is_set()
            assert await assoc.echo() == 0
