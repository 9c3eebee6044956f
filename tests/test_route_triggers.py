"""Series and study triggers of `route` (dicomnet.route.triggers): copies held until their
series / study is stable, then sent together, on an association of their own if asked."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

import dicomnet
from dicomnet.route.config import ConfigError, parse_config
from dicomnet.route.queue import Entry, Queue
from dicomnet.route.router import Router
from dicomnet.route.triggers import Groups, Held

pytestmark = pytest.mark.anyio

CT = get_testdata_file("CT_small.dcm")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def held(n: int, study: str, series: str) -> Held:
    return Held(Entry.named("archive", Path(f"{n:020d}0000-0.dcm")), study, series)


# --- Groups, without a clock ---------------------------------------------------------------


def test_a_series_is_due_once_nothing_new_came_for_stable_after() -> None:
    groups = Groups("series", stable_after=10.0)
    groups.hold([held(1, "st", "A"), held(2, "st", "B")], arrived=100.0)
    groups.hold([held(3, "st", "A")], arrived=105.0)  # A is not stable yet
    assert groups.next_due() == 110.0
    assert groups.take_due(109.9) == []
    (b,) = groups.take_due(110.0)
    assert (b.key, [h.entry for h in b.copies]) == ("B", [held(2, "st", "B").entry])
    assert groups.next_due() == 115.0
    (a,) = groups.take_due(115.0)
    assert [h.series for h in a.copies] == ["A", "A"] and len(groups) == 0
    assert groups.next_due() is None


def test_an_old_copy_does_not_bring_its_group_forward() -> None:
    groups = Groups("study", stable_after=10.0)
    groups.hold([held(1, "S", "A")], arrived=200.0)
    groups.hold([held(2, "S", "B")], arrived=50.0)  # found on disk after a restart
    (study,) = groups.take_due(210.0)
    assert [[h.series for h in part] for part in study.by_series()] == [["A"], ["B"]]


def test_what_could_not_be_sent_is_held_again_with_what_came_meanwhile() -> None:
    groups = Groups("series", stable_after=10.0)
    groups.hold([held(1, "st", "A"), held(2, "st", "A")], arrived=0.0)
    (group,) = groups.take_due(10.0)
    groups.hold([held(3, "st", "A")], arrived=12.0)  # while it was being sent
    groups.hold_again(group, group.copies[1:], due=15.0)  # the destination went down
    assert groups.take_due(21.9) == []
    (again,) = groups.take_due(22.0)
    assert [h.entry.sequence for h in again.copies] == [f"{2:020d}0000", f"{3:020d}0000"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trigger": "patient"}, "trigger is 'instance', 'series' or 'study'"),
        ({"association_per": "series"}, "association_per = 'series' needs trigger"),
        ({"trigger": "series", "association_per": "study"}, "needs trigger = 'study'"),
        ({"trigger": "series", "stable_after": -1.0}, "stable_after is at least 0"),
    ],
)
def test_a_trigger_the_configuration_cannot_mean(change: dict[str, Any], message: str) -> None:
    destination = {"name": "a", "aet": "A", "host": "h", "port": 1, **change}
    with pytest.raises(ConfigError, match=message):
        parse_config({"destination": [destination], "rule": [{"forward": ["a"]}]})


# --- the router, end to end ------------------------------------------------------------------


class Archive:
    """A destination counting what each association carried."""

    def __init__(self) -> None:
        self.by_association: dict[int, list[tuple[str, float]]] = {}
        self.ae = dicomnet.AE("ARCHIVE")
        self.ae.on_store(self.on_store)

    async def on_store(self, request: dicomnet.StoreRequest) -> int:
        series = str(request.dataset.SeriesInstanceUID)
        carried = self.by_association.setdefault(id(request.association), [])
        carried.append((series, anyio.current_time()))
        return 0

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_association.values())


def series_files(folder: Path, study: str, count: int) -> list[Path]:
    """`count` CT instances of one new series of `study`."""
    folder.mkdir(parents=True, exist_ok=True)
    series = generate_uid()
    paths = []
    for _ in range(count):
        ds = dcmread(CT)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(folder / f"{ds.SOPInstanceUID}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def routed(tmp_path: Path, port: int, **destination: Any) -> Any:
    return parse_config(
        {
            "listen": {"port": 0, "aet": "ROUTER"},
            "queue": {"folder": str(tmp_path / "queue"), "fsync": False},
            "destination": [
                {"name": "archive", "aet": "ARCHIVE", "host": "127.0.0.1", "port": port}
                | destination
            ],
            "rule": [{"forward": ["archive"]}],
        }
    )


async def send(port: int, paths: list[Path]) -> None:
    async with dicomnet.connect("127.0.0.1", port, aec="ROUTER") as assoc:
        for path in paths:
            assert (await assoc.store(path)) == 0


@pytest.mark.timeout(60)
async def test_one_association_per_series_once_the_study_is_stable(tmp_path: Path) -> None:
    study = generate_uid()
    first, second = series_files(tmp_path, study, 3), series_files(tmp_path, study, 2)
    archive = Archive()
    async with archive.ae.serve("127.0.0.1", 0) as destination:
        config = routed(
            tmp_path,
            destination.port,
            trigger="study",
            stable_after=0.5,
            association_per="series",
            associations=1,
        )
        async with Router(config).serve() as router:
            await send(router.port, first[:2])
            await anyio.sleep(0.3)
            last_sent = anyio.current_time()
            await send(router.port, [*second, first[2]])  # the study is not stable yet
            await anyio.sleep(0.2)
            assert archive.count == 0  # held
            with anyio.fail_after(10):
                while archive.count < 5:
                    await anyio.sleep(0.02)
    carried = sorted(archive.by_association.values(), key=len)
    assert [len(c) for c in carried] == [2, 3]  # one association per series
    assert all(len({series for series, _ in c}) == 1 for c in carried)
    assert min(t for c in carried for _, t in c) >= last_sent + 0.5


@pytest.mark.timeout(60)
async def test_held_copies_found_after_a_restart_count_from_when_they_were_queued(
    tmp_path: Path,
) -> None:
    """A router stopped while a series was held: after the restart the copies are not held
    for another `stable_after` from the restart, but from their files' times."""
    paths = series_files(tmp_path, generate_uid(), 3)
    archive = Archive()
    async with archive.ae.serve("127.0.0.1", 0) as destination:
        config = routed(tmp_path, destination.port, trigger="series", stable_after=3.0)
        async with Router(config).serve() as router:
            await send(router.port, paths)
        assert archive.count == 0
        queue = Queue(tmp_path / "queue", recover=False)
        pending = queue.pending("archive")
        assert len(pending) == 3
        queued_at = time.time() - 2.5  # as if queued 2.5 s ago
        for entry in pending:
            os.utime(entry.path, (queued_at, queued_at))
        restarted = anyio.current_time()
        async with Router(config).serve():
            with anyio.fail_after(10):
                while archive.count < 3:
                    await anyio.sleep(0.02)
            waited = anyio.current_time() - restarted
    assert waited < 2.0  # ~0.5 s left of the 3 s, not 3 s more


@pytest.mark.timeout(60)
async def test_a_series_cut_short_by_an_outage_is_sent_again_from_where_it_stopped(
    tmp_path: Path,
) -> None:
    from contextlib import asynccontextmanager

    from dicomnet.errors import ConnectionFailed
    from dicomnet.route.config import Destination
    from dicomnet.route.forwarder import Forwarder

    queue = Queue(tmp_path / "queue", ["archive"], fsync=False)
    paths = series_files(tmp_path / "in", generate_uid(), 4)
    entries = []
    for path in paths:
        copy = queue.temp_path()
        copy.write_bytes(path.read_bytes())
        entries += queue.put({"archive": copy})
    sessions: list[list[str]] = []
    failures = [2]  # the third copy of the first session finds the destination gone

    class Session:
        async def store(self, path: str | os.PathLike[str]) -> dicomnet.Status:
            if failures and len(sessions[-1]) == failures[0]:
                failures.pop()
                raise ConnectionFailed("connection reset")
            sessions[-1].append(str(dcmread(path).SOPInstanceUID))
            return dicomnet.Status(0)

    @asynccontextmanager
    async def dedicated() -> Any:
        sessions.append([])
        yield Session()

    destination = Destination(
        "archive", "A", "127.0.0.1", 1, backoff=0.05, max_backoff=0.1,
        trigger="series", stable_after=0.1, association_per="series",
    )  # fmt: skip
    forwarder = Forwarder(queue, destination, Session(), dedicated=dedicated)
    with anyio.fail_after(10):
        async with anyio.create_task_group() as tg:
            tg.start_soon(forwarder.run)
            while forwarder.sent < 4:
                await anyio.sleep(0.02)
            tg.cancel_scope.cancel()
    uids = [str(dcmread(p).SOPInstanceUID) for p in paths]
    assert sessions == [uids[:2], uids[2:]]  # each once, the rest on a new association
    assert queue.pending("archive") == [] and forwarder.retried == 1
