"""`dicomnet.Pool`: associations to one destination, reused, replaced and released, with
the asynchronous operations window (PS3.7 §D.3.3.3) where the peer accepts one."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import ImplicitVRLittleEndian

import dicomnet
from dicomnet.proto.contexts import PresentationContext
from dicomnet.storage import Part10File
from dicomnet.testing import MemoryNetwork

pytestmark = pytest.mark.anyio

CT_FILE = get_testdata_file("CT_small.dcm")
MR_FILE = get_testdata_file("MR_small.dcm")
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77"
SERIAL = itertools.count(1)  # a new SOP Instance UID for each instance made


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def instances(folder: Path, count: int, source: str = CT_FILE) -> list[Path]:
    """`count` Part-10 copies of `source`, each with its own SOP Instance UID."""
    folder.mkdir(parents=True, exist_ok=True)
    dataset = dcmread(source)
    paths = []
    for number in range(1, count + 1):
        uid = f"{UID_ROOT}.{next(SERIAL)}"
        dataset.SOPInstanceUID = uid
        dataset.file_meta.MediaStorageSOPInstanceUID = uid
        path = folder / f"{number}.dcm"
        dataset.save_as(path)
        paths.append(path)
    return paths


def dataset_bytes(path: Path | str) -> bytes:
    info = Part10File.open(path)
    return Path(path).read_bytes()[info.offset :]


class Recorder:
    """An AE that saves what it receives and notes each association and request."""

    def __init__(self, folder: Path, **kwargs: Any) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.ae = dicomnet.AE("PACS", **kwargs)
        self.admitted = 0
        self.requests: list[dicomnet.StoreRequest] = []
        self.hook: Callable[[dicomnet.StoreRequest], Any] | None = None

        @self.ae.on_association
        async def admit(request: dicomnet.AssociationRequest) -> None:
            self.admitted += 1

        @self.ae.on_store
        async def store(request: dicomnet.StoreRequest) -> int:
            self.requests.append(request)
            if self.hook is not None:
                status = await self.hook(request)
                if status is not None:
                    return int(status)
            await request.save(folder, fsync=False)
            return 0

    @property
    def associations(self) -> list[dicomnet.Association]:
        """The server's associations that carried a C-STORE, in order of first use."""
        return list({id(r.association): r.association for r in self.requests}.values())


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not condition():
            await anyio.sleep(0.01)


@pytest.mark.timeout(60)
async def test_many_tasks_share_at_most_max_associations(tmp_path: Path) -> None:
    files = instances(tmp_path / "out", 50)
    server_side = Recorder(tmp_path / "in")
    statuses: list[dicomnet.Status] = []

    async def worker(pool: dicomnet.Pool, mine: list[Path]) -> None:
        for path in mine:
            statuses.append(await pool.store(path))

    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS", max_associations=2) as pool:
            async with anyio.create_task_group() as tg:
                for number in range(10):
                    tg.start_soon(worker, pool, files[number::10])
            stats = pool.stats
        assert pool.stats.open == 0
        for association in server_side.associations:  # leaving the block released them
            with anyio.fail_after(10):
                await association.wait_closed()
            assert association.outcome == "released"
    assert len(statuses) == 50 and all(s.is_success for s in statuses)
    assert server_side.admitted <= 2 and stats.opened == server_side.admitted
    assert (stats.sent, stats.failed, stats.reused) == (50, 0, 50 - stats.opened)
    assert stats.peak_outstanding == 1  # no window proposed: one at a time
    for path in files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(server_side.folder / f"{uid}.dcm") == dataset_bytes(path)


@pytest.mark.timeout(30)
async def test_window_keeps_several_stores_outstanding_on_one_association(
    tmp_path: Path,
) -> None:
    files = instances(tmp_path / "out", 6)
    warned = dcmread(files[2], stop_before_pixels=True).SOPInstanceUID
    server_side = Recorder(tmp_path / "in", async_operations_window=(4, 4))
    three_in = anyio.Event()
    active = peak = 0

    async def hold(request: dicomnet.StoreRequest) -> int | None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        if active >= 3:
            three_in.set()
        await three_in.wait()  # answered only once three requests are outstanding
        await anyio.sleep(0.01 * (len(server_side.requests) % 3))  # in another order
        active -= 1
        await request.save(server_side.folder, fsync=False)
        return 0xB000 if request.sop_instance_uid == warned else 0

    server_side.hook = hold
    results: dict[str, dicomnet.Status] = {}

    async def send(pool: dicomnet.Pool, path: Path) -> None:
        results[dcmread(path, stop_before_pixels=True).SOPInstanceUID] = await pool.store(path)

    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool(
            "127.0.0.1", server.port, aec="PACS", max_associations=1, window=4
        ) as pool:
            with anyio.fail_after(10):
                async with anyio.create_task_group() as tg:
                    for path in files:
                        tg.start_soon(send, pool, path)
            stats = pool.stats
    assert stats.opened == 1 and server_side.admitted == 1
    assert stats.peak_outstanding == 4  # our window, which the AE accepted
    assert 3 <= peak <= 4
    message_ids = [r.message.message_id for r in server_side.requests]
    assert len(set(message_ids)) == len(message_ids) == 6
    # Each response reached its own caller (routed by Message ID Being Responded To).
    assert {uid for uid, status in results.items() if status.is_warning} == {warned}
    assert sum(status.is_success for status in results.values()) == 5


async def store_concurrently(pool: dicomnet.Pool, files: list[Path]) -> list[dicomnet.Status]:
    statuses: list[dicomnet.Status] = []

    async def send(path: Path) -> None:
        statuses.append(await pool.store(path))

    async with anyio.create_task_group() as tg:
        for path in files:
            tg.start_soon(send, path)
    return statuses


@pytest.mark.dcmtk
@pytest.mark.timeout(60)
async def test_dcmtk_storescp_one_operation_at_a_time(tmp_path: Path, storescp: Any) -> None:
    scp = storescp()
    files = instances(tmp_path / "out", 6)
    async with dicomnet.Pool(
        "127.0.0.1", scp.port, aec=scp.aet, max_associations=1, window=4
    ) as pool:
        statuses = await store_concurrently(pool, files)
        stats = pool.stats
    assert all(s.is_success for s in statuses) and len(statuses) == 6
    assert (stats.opened, stats.peak_outstanding) == (1, 1)  # storescp has no window
    received = await anyio.to_thread.run_sync(scp.wait_received, 6)
    assert len(received) == 6
    for path in files:
        uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert dataset_bytes(received[uid]) == dataset_bytes(path)
    log = scp.log_text()
    assert len(re.findall(r"Association Received", log)) == 1, log


@pytest.mark.dcmtk
@pytest.mark.timeout(60)
async def test_a_peer_serving_one_association_at_a_time_gets_everything_at_once(
    tmp_path: Path, storescp: Any
) -> None:
    """storescp (no --fork) answers a second association only after the first ends: the
    stores go on the association it serves instead of waiting for the second one."""
    scp = storescp()
    files = instances(tmp_path / "ct", 8) + instances(tmp_path / "mr", 8, MR_FILE)
    async with dicomnet.Pool(
        "127.0.0.1", scp.port, aec=scp.aet, max_associations=2, idle_timeout=None
    ) as pool:
        with anyio.fail_after(20):  # before: until an idle timeout released one (never here)
            statuses = await store_concurrently(pool, files)
    assert len(statuses) == 16 and all(s.is_success for s in statuses)
    received = await anyio.to_thread.run_sync(scp.wait_received, 16)
    assert len(received) == 16


@pytest.mark.timeout(30)
async def test_an_association_idle_for_a_while_is_checked_and_replaced_if_silent(
    tmp_path: Path,
) -> None:
    server_side = Recorder(tmp_path / "in")
    echoes: list[float] = []

    @server_side.ae.on_echo
    async def echo(request: Any) -> int:
        echoes.append(anyio.current_time())
        if len(echoes) == 1:
            await anyio.sleep(10)  # as silent as a connection a firewall dropped
        return 0

    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool(
            "127.0.0.1", server.port, aec="PACS", check_after=0.2, dimse_timeout=1.0
        ) as pool:
            assert (await pool.store(CT_FILE)).is_success
            assert (await pool.store(CT_FILE)).is_success  # just used: no check
            await anyio.sleep(0.3)
            assert (await pool.store(CT_FILE)).is_success  # checked; no answer: a new one
            await anyio.sleep(0.3)
            assert (await pool.store(CT_FILE)).is_success  # checked: answered
            stats = pool.stats
    assert len(echoes) == 2
    first, second, third, fourth = (r.association for r in server_side.requests)
    assert first is second and third is not first and fourth is third
    assert (stats.opened, stats.retried) == (2, 1)


@pytest.mark.timeout(60)
async def test_pynetdicom_scp_one_operation_at_a_time(tmp_path: Path, pynetdicom_scp: Any) -> None:
    scp = pynetdicom_scp()
    files = instances(tmp_path / "out", 6)
    async with dicomnet.Pool(
        "127.0.0.1", scp.port, aec=scp.aet, max_associations=1, window=4
    ) as pool:
        statuses = await store_concurrently(pool, files)
        stats = pool.stats
        assert len(scp._server.active_associations) == 1
    assert all(s.is_success for s in statuses) and len(statuses) == 6
    assert (stats.opened, stats.peak_outstanding) == (1, 1)
    assert not scp.errors
    assert len(scp.received) == 6
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert scp.received[uid].path.read_bytes() == dataset_bytes(path)


@pytest.mark.timeout(30)
async def test_a_new_kind_opens_an_association_proposed_for_it(tmp_path: Path) -> None:
    server_side = Recorder(tmp_path / "in")
    mr_storage = str(dcmread(MR_FILE, stop_before_pixels=True).SOPClassUID)
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS", max_associations=2) as pool:
            assert (await pool.store(CT_FILE)).is_success
            assert (await pool.store(MR_FILE)).is_success  # not in the first one's contexts
            assert (await pool.store(CT_FILE)).is_success
            stats = pool.stats
    first, second, third = (r.association for r in server_side.requests)
    assert first is third and second is not first  # the first association still takes CTs
    accepted = [{c.abstract_syntax for c in a.accepted_contexts} for a in (first, second)]
    assert accepted == [{CT_STORAGE, VERIFICATION}, {CT_STORAGE, mr_storage, VERIFICATION}]
    assert (stats.opened, stats.reused) == (2, 1)


@pytest.mark.timeout(30)
async def test_at_the_limit_an_idle_association_makes_room(tmp_path: Path) -> None:
    server_side = Recorder(tmp_path / "in")
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS", max_associations=1) as pool:
            await pool.store(CT_FILE)
            await pool.store(MR_FILE)
            await pool.store(CT_FILE)
            stats = pool.stats
        first, second, third = (r.association for r in server_side.requests)
        assert first is not second and second is third
        assert first.outcome == "released"
    assert (stats.opened, stats.open) == (2, 1)


@pytest.mark.timeout(30)
async def test_a_kind_the_peer_refuses_fails_for_its_caller_only(tmp_path: Path) -> None:
    server_side = Recorder(tmp_path / "in", contexts=[PresentationContext(CT_STORAGE)])
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS", max_associations=2) as pool:
            assert (await pool.store(CT_FILE)).is_success
            for _ in range(2):
                with pytest.raises(dicomnet.NotNegotiatedError, match="not accepted"):
                    await pool.store(MR_FILE)
            assert (await pool.store(CT_FILE)).is_success
            stats = pool.stats
    # The second MR was refused by the association already proposed for it.
    assert (stats.opened, stats.sent, stats.failed) == (2, 2, 2)


@pytest.mark.timeout(30)
async def test_an_association_aborted_during_a_store(tmp_path: Path) -> None:
    ct, other = instances(tmp_path / "out", 2)
    server_side = Recorder(tmp_path / "in")
    holding = anyio.Event()

    async def hang(request: dicomnet.StoreRequest) -> None:
        holding.set()
        await anyio.sleep_forever()  # until the association ends

    server_side.hook = hang
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS") as pool:
            async with anyio.create_task_group() as tg:

                async def doomed() -> None:
                    # The request went out: not sent again, the caller decides.
                    with pytest.raises(dicomnet.AssociationAborted):
                        await pool.store(ct)

                tg.start_soon(doomed)
                with anyio.fail_after(10):
                    await holding.wait()
                await server_side.requests[0].association.abort()
            server_side.hook = None
            assert (await pool.store(other)).is_success
            stats = pool.stats
    assert (stats.opened, stats.sent, stats.failed, stats.retried) == (2, 1, 1, 0)
    assert len(server_side.requests) == 2  # the aborted store was not repeated


@pytest.mark.timeout(30)
async def test_an_idle_association_aborted_by_the_peer_is_replaced(tmp_path: Path) -> None:
    files = instances(tmp_path / "out", 2)
    server_side = Recorder(tmp_path / "in")
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS") as pool:
            await pool.store(files[0])
            await server_side.requests[0].association.abort()
            # Once the A-ABORT is read the association leaves the pool. (A store that
            # went out before it was read would be raised, not sent again: the peer
            # may have had it.)
            await wait_until(lambda: pool.stats.open == 0)
            assert (await pool.store(files[1])).is_success
            stats = pool.stats
    assert (stats.opened, stats.sent, stats.failed) == (2, 2, 0)
    first, second = server_side.associations
    assert first is not second and second.outcome == "released"


@pytest.mark.timeout(30)
async def test_a_store_not_yet_sent_is_retried_once_on_a_new_association(
    tmp_path: Path,
) -> None:
    """The connection breaks unnoticed; the next request fails before any byte of it
    went out, so it is sent again on a new association."""
    files = instances(tmp_path / "out", 2)
    net = MemoryNetwork()
    server_side = Recorder(tmp_path / "in")
    async with server_side.ae.serve("127.0.0.1", 104, backend=net):
        async with dicomnet.Pool("127.0.0.1", 104, aec="PACS", backend=net) as pool:
            await pool.store(files[0])
            client_end = net.streams[0][0]

            async def broken(data: bytes | bytearray) -> None:
                raise anyio.BrokenResourceError

            client_end.send = broken  # type: ignore[method-assign]
            assert (await pool.store(files[1])).is_success
            stats = pool.stats
    assert (stats.opened, stats.sent, stats.failed, stats.retried) == (2, 2, 0, 1)
    assert [r.sop_instance_uid for r in server_side.requests] == [
        str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files
    ]


@pytest.mark.timeout(30)
async def test_idle_associations_are_released(tmp_path: Path) -> None:
    files = instances(tmp_path / "out", 2)
    server_side = Recorder(tmp_path / "in")
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS", idle_timeout=0.2) as pool:
            await pool.store(files[0])
            first = server_side.requests[0].association
            with anyio.fail_after(5):
                await first.wait_closed()
            assert first.outcome == "released"  # A-RELEASE, not an abort
            await wait_until(lambda: pool.stats.open == 0)
            await pool.store(files[1])  # a new one
            assert server_side.requests[1].association is not first
            stats = pool.stats
    assert (stats.opened, stats.sent) == (2, 2)


@pytest.mark.timeout(30)
async def test_aclose_releases_and_refuses_further_stores(tmp_path: Path) -> None:
    server_side = Recorder(tmp_path / "in")
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS") as pool:
            await pool.store(CT_FILE)
            await pool.aclose()
            assert pool.stats.open == 0
            with anyio.fail_after(5):
                await server_side.associations[0].wait_closed()
            assert server_side.associations[0].outcome == "released"
            with pytest.raises(dicomnet.InvalidStateError):
                await pool.store(CT_FILE)


@pytest.mark.timeout(30)
async def test_transfer_syntax_is_passed_through(tmp_path: Path) -> None:
    assert Part10File.open(CT_FILE).transfer_syntax != ImplicitVRLittleEndian
    server_side = Recorder(tmp_path / "in")
    pool = dicomnet.Pool("127.0.0.1", 1, aec="PACS")
    with pytest.raises(dicomnet.InvalidStateError):  # only within `async with`
        await pool.store(CT_FILE)
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS") as pool:
            await pool.store(CT_FILE, transfer_syntax=ImplicitVRLittleEndian)
            await pool.store(dcmread(MR_FILE))
    assert server_side.requests[0].transfer_syntax == ImplicitVRLittleEndian
    assert server_side.requests[1].sop_class_uid == dcmread(MR_FILE).SOPClassUID


@pytest.mark.timeout(30)
async def test_kinds_mixed_from_many_tasks_at_a_limit_of_one(tmp_path: Path) -> None:
    cts = instances(tmp_path / "ct", 4)
    mrs = instances(tmp_path / "mr", 4, MR_FILE)
    server_side = Recorder(tmp_path / "in")
    async with server_side.ae.serve("127.0.0.1", 0) as server:
        async with dicomnet.Pool("127.0.0.1", server.port, aec="PACS", max_associations=1) as pool:
            with anyio.fail_after(20):
                statuses = await store_concurrently(
                    pool, [p for pair in zip(cts, mrs, strict=True) for p in pair]
                )
            stats = pool.stats
    assert len(statuses) == 8 and all(s.is_success for s in statuses)
    # The first association knew CTs only; the one replacing it was proposed both kinds.
    assert stats.opened == 2 and server_side.admitted == 2
    assert len({r.sop_instance_uid for r in server_side.requests}) == 8
