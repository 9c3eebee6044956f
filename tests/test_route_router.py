"""The router end to end in one process: dicomnet sends to it, rules pick destinations
(dicomnet AEs), copies arrive as received or coerced, and a restart resends what was
not confirmed."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

import dicomnet
from dicomnet.proto.contexts import contexts_for_instances
from dicomnet.route.config import Destination, parse_config
from dicomnet.route.router import Router
from dicomnet.status import Status
from dicomnet.storage import Part10File

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def dataset_bytes(path: str | os.PathLike[str]) -> bytes:
    info = Part10File.open(path)
    with open(path, "rb") as f:
        f.seek(info.offset)
        return f.read()


class Archive:
    """A destination: a dicomnet AE keeping what it receives, answering `status`."""

    def __init__(self, folder: Path, title: str) -> None:
        self.folder = folder
        self.received: list[Path] = []
        self.status = 0x0000
        self.ae = dicomnet.AE(title)
        self.ae.on_store(self.on_store)

    async def on_store(self, request: dicomnet.StoreRequest) -> int:
        if self.status != 0:
            return self.status
        path = await request.save(self.folder / f"{request.sop_instance_uid}.dcm")
        self.received.append(path)
        return 0


class OneShotSender:
    """An association per copy (the tests of the pool are elsewhere)."""

    def __init__(self, destination: Destination, aet: str) -> None:
        self.destination = destination
        self.aet = aet

    async def store(self, path: str | os.PathLike[str]) -> Status:
        info = Part10File.open(path)
        contexts = contexts_for_instances([(info.sop_class_uid, info.transfer_syntax)])
        d = self.destination
        async with dicomnet.connect(
            d.host, d.port, aet=self.aet, aec=d.aet, contexts=contexts
        ) as assoc:
            return await assoc.store(path)


def one_shot(aet: str) -> Callable[[Destination], Any]:
    @asynccontextmanager
    async def make(destination: Destination) -> AsyncIterator[OneShotSender]:
        yield OneShotSender(destination, aet)

    return make


def config(tmp_path: Path, ports: dict[str, int], **queue: object) -> Any:
    return parse_config(
        {
            "listen": {"port": 0, "aet": "ROUTER"},
            "queue": {"folder": str(tmp_path / "queue"), "fsync": False, **queue},
            "destination": [
                {"name": n, "aet": n.upper(), "host": "127.0.0.1", "port": p, "backoff": 0.05}
                for n, p in ports.items()
            ],
            "rule": [
                {"match": {"Modality": "CT"}, "forward": ["archive"]},
                {
                    "match": {"Modality": "MR"},
                    "forward": ["archive", "research"],
                    "set": {"InstitutionName": "ROUTED"},
                },
            ],
        }
    )


async def send(port: int, *paths: str) -> list[Status]:
    async with dicomnet.connect("127.0.0.1", port, aec="ROUTER") as assoc:
        return [await assoc.store(p) for p in paths]


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await anyio.sleep(0.02)


async def test_each_instance_reaches_its_destinations_as_received_or_coerced(
    tmp_path: Path,
) -> None:
    archive = Archive(tmp_path / "a", "ARCHIVE")
    research = Archive(tmp_path / "r", "RESEARCH")
    (tmp_path / "a").mkdir()
    (tmp_path / "r").mkdir()
    async with archive.ae.serve("127.0.0.1", 0) as a, research.ae.serve("127.0.0.1", 0) as r:
        routed = config(tmp_path, {"archive": a.port, "research": r.port})
        router = Router(routed, senders=one_shot("ROUTER"))
        async with router.serve() as server:
            assert await send(server.port, CT, MR) == [0, 0]
            await wait_for(lambda: len(archive.received) == 2 and len(research.received) == 1)
    by_modality = {dcmread(p).Modality: p for p in archive.received}
    assert dataset_bytes(by_modality["CT"]) == dataset_bytes(CT)  # as received
    # The MR: coerced for both of its destinations, the rest unchanged.
    for path in (by_modality["MR"], research.received[0]):
        routed_mr, original = dcmread(path), dcmread(MR)
        assert routed_mr.InstitutionName == "ROUTED"
        del routed_mr.InstitutionName, original.InstitutionName
        assert routed_mr == original
    assert router.queue.status()["archive"].queued == 0


async def test_an_unrouted_instance_is_refused_and_a_full_queue_says_out_of_resources(
    tmp_path: Path,
) -> None:
    archive = Archive(tmp_path, "ARCHIVE")
    archive.status = 0xA700  # the archive is full: copies stay queued
    rtplan = get_testdata_file("rtplan.dcm")  # no Modality CT or MR: no rule
    async with archive.ae.serve("127.0.0.1", 0) as a:
        routed = config(tmp_path, {"archive": a.port, "research": a.port}, max_queued=1)
        async with Router(routed, senders=one_shot("ROUTER")).serve() as server:
            async with dicomnet.connect("127.0.0.1", server.port, aec="ROUTER") as assoc:
                with pytest.raises(dicomnet.DimseError) as refused:
                    await assoc.store(rtplan)
                assert refused.value.status == 0xC000
                assert await assoc.store(CT) == 0
                with pytest.raises(dicomnet.DimseError) as full:
                    await assoc.store(CT)
                assert full.value.status == 0xA700


async def test_a_restart_sends_what_was_queued_and_not_confirmed(tmp_path: Path) -> None:
    archive = Archive(tmp_path / "a", "ARCHIVE")
    (tmp_path / "a").mkdir()
    async with archive.ae.serve("127.0.0.1", 0) as a:
        routed = config(tmp_path, {"archive": a.port, "research": a.port})
        archive.status = 0xA700  # down for now: the copies wait in the queue
        async with Router(routed, senders=one_shot("ROUTER")).serve() as server:
            assert await send(server.port, CT, CT) == [0, 0]
        assert len(list((tmp_path / "queue" / "archive" / "pending").glob("*.dcm"))) == 2
        archive.status = 0x0000
        async with Router(routed, senders=one_shot("ROUTER")).serve():
            await wait_for(lambda: len(archive.received) == 2)
    assert all(dataset_bytes(p) == dataset_bytes(CT) for p in archive.received)


async def test_who_may_send_users_and_an_access_policy(tmp_path: Path) -> None:
    """`[listen] users`, `require_user` and `access`: the security of `serve`, in route."""
    from dicomnet.identity import UserIdentity, hash_password, write_user

    users = tmp_path / "users"
    for name in ("modality", "viewer"):
        write_user(users, name, hash_password("secret", n=2**4))
    access = tmp_path / "access.toml"
    access.write_text(
        '[[rule]]\nuser = "modality"\nservices = ["echo", "store"]\n\n'
        '[[rule]]\nuser = "viewer"\nservices = ["echo"]\n'
    )
    archive = Archive(tmp_path, "ARCHIVE")
    async with archive.ae.serve("127.0.0.1", 0) as a:
        routed = config(tmp_path, {"archive": a.port, "research": a.port})
        secured = replace(routed, users=str(users), require_user=True, access=str(access))
        async with Router(secured, senders=one_shot("ROUTER")).serve() as server:
            with pytest.raises(dicomnet.AssociationRejected):
                await send(server.port, CT)  # no identity
            wrong = UserIdentity.password("modality", "guess")
            with pytest.raises(dicomnet.AssociationRejected):
                async with dicomnet.connect(
                    "127.0.0.1", server.port, aec="ROUTER", user_identity=wrong
                ):
                    pass
            viewer = UserIdentity.password("viewer", "secret")
            async with dicomnet.connect(
                "127.0.0.1", server.port, aec="ROUTER", user_identity=viewer
            ) as assoc:
                with pytest.raises(dicomnet.NotNegotiatedError):
                    await assoc.store(CT)  # the policy gives the viewer no store
            right = UserIdentity.password("modality", "secret")
            async with dicomnet.connect(
                "127.0.0.1", server.port, aec="ROUTER", user_identity=right
            ) as assoc:
                assert await assoc.store(CT) == 0
            await wait_for(lambda: len(archive.received) == 1)


async def test_pynetdicom_sends_through_the_router_to_pynetdicom(
    tmp_path: Path, pynetdicom_scp: Callable[..., Any]
) -> None:
    """pynetdicom on both sides: its SCU into the router, the router's pool into its SCP,
    the CT's data set as pynetdicom sent it (Explicit VR Little Endian, as the file)."""
    from peers import free_port
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE as PynetdicomAE

    destination = pynetdicom_scp()
    research = free_port()  # down: its MR copy waits in the queue
    routed = config(tmp_path, {"archive": destination.port, "research": research})
    routed = replace(
        routed, destinations=tuple(replace(d, aet=destination.aet) for d in routed.destinations)
    )
    paths = [CT, MR]

    def send(port: int) -> list[int]:
        scu = PynetdicomAE(ae_title="PYNSCU")
        for path in paths:
            scu.add_requested_context(str(dcmread(path).SOPClassUID), ExplicitVRLittleEndian)
        assoc = scu.associate("127.0.0.1", port, ae_title="ROUTER")
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(dcmread(p)).Status) for p in paths]
        finally:
            assoc.release()

    async with Router(routed).serve() as server:
        assert await anyio.to_thread.run_sync(send, server.port) == [0, 0]
        await wait_for(lambda: len(destination.received) == 2)  # the CT, the MR (coerced)
    by_uid = {str(dcmread(p).SOPInstanceUID): p for p in paths}
    ct_uid = str(dcmread(CT).SOPInstanceUID)
    assert set(destination.received) == set(by_uid) and not destination.errors
    assert destination.received[ct_uid].path.read_bytes() == dataset_bytes(CT)
