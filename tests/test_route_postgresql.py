"""Two `dicomnet route` nodes sharing one queue (a folder and a PostgreSQL database):
DCMTK storescu sends to both, a pynetdicom SCP counts what arrives. Each instance is
delivered once; a node killed mid-stream leaves its copies to the other."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import postgres
import pytest
from peers import (
    HOST,
    REPO_ROOT,
    ManagedProcess,
    PynetdicomSCP,
    dicomnet_command,
    dicomnet_env,
    run_dicomnet,
    start_listening_process,
    storescu,
    wait_until,
)
from test_route_interop import instances

pytestmark = pytest.mark.dcmtk


@dataclass
class CountingSCP(PynetdicomSCP):
    """Every C-STORE it answers, in order: (calling AE title, SOP Instance UID); each
    answered after `delay` seconds (a destination slower than the routers)."""

    delay: float = 0.0
    deliveries: list[tuple[str, str]] = field(default_factory=list)

    def _on_store(self, event: Any) -> int:
        time.sleep(self.delay)
        status = super()._on_store(event)
        with self._lock:
            self.deliveries.append(
                (str(event.assoc.requestor.ae_title), str(event.request.AffectedSOPInstanceUID))
            )
        return status

    def __enter__(self) -> CountingSCP:
        self.start()
        return self


def start_node(
    workdir: Path, name: str, url: str, destination: int, lease: float = 30.0
) -> tuple[ManagedProcess, int]:
    """A route node named `name` (AE title ROUTE-<NAME>) on the queue of `workdir`."""
    aet = f"ROUTE-{name.upper()}"

    def argv(port: int) -> list[str]:
        config = workdir / f"{name}.toml"
        config.write_text(
            f'[listen]\nhost = "{HOST}"\nport = {port}\naet = "{aet}"\n'
            f'[queue]\nfolder = "{workdir / "queue"}"\nfsync = false\n'
            f'database = "{url}"\nnode = "{name}"\nlease = {lease}\n'
            f'[[destination]]\nname = "archive"\naet = "ARCHIVE"\nhost = "{HOST}"\n'
            f"port = {destination}\nassociations = 1\nbackoff = 0.2\nmax_backoff = 1.0\n"
            '[[rule]]\nforward = ["archive"]\n'
        )
        return [*dicomnet_command(), "route", "--config", str(config), "-v"]

    workdir.mkdir(parents=True, exist_ok=True)
    env = dicomnet_env(workdir / "tmp")
    log = workdir / f"{name}.log"
    return start_listening_process("dicomnet route", argv, log, env=env, cwd=REPO_ROOT)


@pytest.fixture
def url(postgresql_server: Any) -> str:
    return postgres.fresh_schema(postgresql_server)


@pytest.mark.timeout(180)
def test_two_nodes_share_a_queue_and_send_each_instance_once(tmp_path: Path, url: str) -> None:
    files = instances(tmp_path / "in", "CT_small.dcm", 40)
    # Slower than the routers: copies wait in the queue while both nodes look at it.
    with CountingSCP(tmp_path / "out", aet="ARCHIVE", delay=0.05) as archive:
        a, port_a = start_node(tmp_path / "route", "a", url, archive.port)
        b, port_b = start_node(tmp_path / "route", "b", url, archive.port)
        try:
            halves = ((port_a, files[:20], "ROUTE-A"), (port_b, files[20:], "ROUTE-B"))
            sent = [
                threading.Thread(target=storescu, args=(p, half), kwargs={"aec": aec})
                for p, half, aec in halves
            ]
            for t in sent:
                t.start()
            for t in sent:
                t.join(120)
            assert wait_until(lambda: len(archive.deliveries) >= 40, 60), a.log_text()
            time.sleep(2.0)  # four rescans of each node: a copy sent twice would show
            config = tmp_path / "route" / "a.toml"
            status = run_dicomnet(["route", "status", "--json", "--config", config])
        finally:
            a.stop()
            b.stop()
    by_uid = Counter(uid for _, uid in archive.deliveries)
    assert len(by_uid) == 40 and set(by_uid.values()) == {1}, archive.deliveries
    by_node = Counter(aet for aet, _ in archive.deliveries)
    assert by_node == {"ROUTE-A": 20, "ROUTE-B": 20}  # each sent what it took in
    assert status.returncode == 0, status
    assert '"queued": 0' in status.stdout and '"running": true' in status.stdout
    assert not archive.errors


@pytest.mark.timeout(180)
def test_a_node_killed_mid_stream_leaves_its_copies_to_the_other(tmp_path: Path, url: str) -> None:
    files = instances(tmp_path / "in", "CT_small.dcm", 40)
    with CountingSCP(tmp_path / "out", aet="ARCHIVE", delay=0.05) as archive:
        a, port_a = start_node(tmp_path / "route", "a", url, archive.port, lease=2.0)
        b, _ = start_node(tmp_path / "route", "b", url, archive.port, lease=2.0)
        try:
            result = storescu(port_a, files, aec="ROUTE-A")  # all acknowledged: queued
            assert result.returncode == 0, result
            assert wait_until(lambda: len(archive.deliveries) >= 8, 30), a.log_text()
            assert a.proc is not None
            a.proc.send_signal(signal.SIGKILL)  # mid-stream: a copy on its way
            a.proc.wait(10)
            killed_at = len(archive.deliveries)
            assert killed_at < 40  # it was killed with copies left
            assert wait_until(lambda: len({u for _, u in archive.deliveries}) >= 40, 60), (
                b.log_text()
            )
            time.sleep(1.0)
        finally:
            a.stop()
            b.stop()
    by_uid = Counter(uid for _, uid in archive.deliveries)
    assert len(by_uid) == 40  # none lost
    twice = [uid for uid, n in by_uid.items() if n > 1]
    # Only the copy a had on its way when it was killed (one association, window 1)
    # can have been confirmed without its row gone: b sends it once more.
    assert len(twice) <= 1 and max(by_uid.values()) <= 2, by_uid
    from_a = {uid for aet, uid in archive.deliveries if aet == "ROUTE-A"}
    from_b = {uid for aet, uid in archive.deliveries if aet == "ROUTE-B"}
    assert from_b and from_a | from_b == set(by_uid)  # b delivered what a had left
    assert len(from_b - from_a) >= 40 - killed_at - 1
