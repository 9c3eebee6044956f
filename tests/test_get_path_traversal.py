"""A hostile C-GET / C-MOVE SCP cannot make the retrieving side write outside its folder:
SOP Instance UIDs such as ``../../x`` or ``/abs/x`` never become paths (the class of the
2026 DCMTK C-GET client vulnerability)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import anyio.to_thread
import pytest
from peers import describe_cli, run_dicomnet
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.cli.get import get_contexts
from dicomnet.server import retrieve_listener
from dicomnet.services.qr import RetrieveRequest
from dicomnet.storage import Spool, safe_file_name

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.timeout(90),
    pytest.mark.filterwarnings("ignore:.*for VR UI:UserWarning"),
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def hostile_uids(root: Path) -> list[str]:
    """UIDs that, taken as file names, would land outside `root / 'work' / 'out'`."""
    return [
        "../../escaped",
        "../escaped-too",
        f"{root}/absolute",
        "..",
        "a\\b",
        "sub/dir",
    ]


def instances(uids: list[str]) -> list[Dataset]:
    out = []
    for uid in uids:
        dataset = dcmread(get_testdata_file("CT_small.dcm"))
        dataset.SOPInstanceUID = uid
        out.append(dataset)
    return out


@asynccontextmanager
async def hostile_scp(uids: list[str], peers: dict[str, tuple[str, int]]) -> AsyncIterator[int]:
    """An SCP of ours that answers every C-GET / C-MOVE with instances named `uids`."""
    ae = dicomnet.AE("EVIL", peers=peers)

    @ae.on_get
    async def get(request: RetrieveRequest) -> AsyncIterator[Dataset]:
        for dataset in instances(uids):
            yield dataset

    @ae.on_move
    async def move(request: RetrieveRequest) -> AsyncIterator[Dataset]:
        for dataset in instances(uids):
            yield dataset

    async with ae.serve("127.0.0.1", 0) as server:
        yield server.port


def everything_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} | {p for p in Path("/").glob("absolute*")}


@pytest.mark.parametrize("via", ["get", "move"])
async def test_the_get_command_writes_only_into_its_folder(tmp_path: Path, via: str) -> None:
    out = tmp_path / "work" / "out"
    good = generate_uid()
    uids = [*hostile_uids(tmp_path), good]
    listen_port = 0
    if via == "move":
        from peers import free_port

        listen_port = free_port()
    peers = {"GETTER": ("127.0.0.1", listen_port)}
    async with hostile_scp(uids, peers) as port:
        args = ["get", "127.0.0.1", port, "--aec", "EVIL", "--aet", "GETTER"]
        args += ["--out", out, "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID=1.2"]
        if via == "move":
            args += ["--via", "move", "--listen-port", listen_port]
        result = await anyio.to_thread.run_sync(lambda: run_dicomnet(args, timeout=60))
    assert result.returncode in (0, 1), describe_cli(result)
    written = everything_under(tmp_path)
    assert written <= {tmp_path / "work", out, out / f"{good}.dcm"}, describe_cli(result)
    assert out / f"{good}.dcm" in written, describe_cli(result)
    assert not Path(f"{tmp_path}/absolute.dcm").exists()


async def test_saving_into_a_folder_never_leaves_it(tmp_path: Path) -> None:
    out = tmp_path / "work" / "out"
    out.mkdir(parents=True)
    good = generate_uid()
    uids = [*hostile_uids(tmp_path), good]
    saved: list[Path] = []
    async with hostile_scp(uids, {}) as port:
        contexts = get_contexts("study")
        async with dicomnet.connect("127.0.0.1", port, aec="EVIL", contexts=contexts) as assoc:
            query = Dataset()
            query.QueryRetrieveLevel = "STUDY"
            query.StudyInstanceUID = "1.2"
            with anyio.fail_after(30):
                responses = assoc.get(query, model="study")
                async for instance in responses:
                    saved.append(await instance.save(out, fsync=False))
    assert saved == [out / f"{good}.dcm"]  # the others were refused on arrival (C000)
    assert responses.progress is not None and responses.progress.failed == len(uids) - 1
    assert everything_under(tmp_path) == {tmp_path / "work", out, out / f"{good}.dcm"}


async def test_a_retrieve_listener_refuses_hostile_uids(tmp_path: Path) -> None:
    """C-MOVE to a listener of ours: the same."""
    out = tmp_path / "out"
    out.mkdir()
    good = generate_uid()
    uids = [*hostile_uids(tmp_path), good]
    async with retrieve_listener("GETTER") as listener:
        peers = {"GETTER": ("127.0.0.1", listener.port)}
        async with hostile_scp(uids, peers) as port:
            async with dicomnet.connect("127.0.0.1", port, aec="EVIL") as assoc:
                query = Dataset()
                query.QueryRetrieveLevel = "STUDY"
                query.StudyInstanceUID = "1.2"
                names = []
                with anyio.fail_after(30):
                    retrieved = assoc.retrieve(query, model="study", via="move", listener=listener)
                    async for instance in retrieved:
                        names.append((await instance.save(out, fsync=False)).name)
    assert names == [f"{good}.dcm"]
    assert set(os.listdir(out)) == {f"{good}.dcm"}
    assert everything_under(tmp_path) == {out, out / f"{good}.dcm"}


@pytest.mark.parametrize("uid", ["../../x", "/etc/x", "a\\b", "..", "", "1.2/3", "1.2.3\x00"])
def test_an_invalid_uid_gets_a_derived_name_in_the_folder(
    tmp_path: Path, uid: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dicomnet"):
        name = safe_file_name(uid)
    assert name.startswith("invalid-uid-") and name.endswith(".dcm")
    assert (tmp_path / name).parent == tmp_path and "/" not in name and "\\" not in name
    assert "not a valid UID" in caplog.text
    assert safe_file_name("1.2.840.10008.1.1") == "1.2.840.10008.1.1.dcm"
    assert safe_file_name(uid) == name  # derived, so the same UID gets the same name


async def test_store_request_save_into_a_folder_uses_the_safe_name(tmp_path: Path) -> None:
    """`StoreRequest.save(folder)` for a request whose UID the service did not check."""
    from dicomnet.services.storage import StoreRequest

    class Message:
        affected_sop_instance_uid = "../../outside"

    spool = Spool(b"\x00" * 132 + b"DICM", 1 << 20)
    request = StoreRequest(None, None, Message(), spool, fsync=False)  # type: ignore[arg-type]
    out = tmp_path / "out"
    out.mkdir()
    path = await request.save(out)
    assert path.parent == out and path.name.startswith("invalid-uid-")
    assert everything_under(tmp_path) == {out, path}
