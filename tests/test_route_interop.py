"""`dicomnet route` between real peers: DCMTK storescu sending on several associations at
once, DCMTK storescp and `dicomnet serve` as destinations; a destination down, and a
`kill -9` of the router."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from peers import (
    HOST,
    REPO_ROOT,
    DicomnetServer,
    ManagedProcess,
    StoreSCP,
    dataset_bytes,
    dicomnet_command,
    dicomnet_env,
    free_port,
    index_part10_tree,
    metric_sample,
    scrape_metrics,
    start_listening_process,
    storescu,
    wait_until,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

pytestmark = pytest.mark.dcmtk


def instances(folder: Path, name: str, count: int) -> list[Path]:
    """`count` copies of a pydicom test file under new SOP Instance UIDs, without the Data
    Set Trailing Padding that storescu leaves out when it sends (PS3.10 §7.2)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for n in range(count):
        ds = dcmread(get_testdata_file(name))
        del ds[0xFFFCFFFC]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{name[:2]}{n:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def route_argv(
    workdir: Path,
    port: int,
    destinations: dict[str, tuple[str, int]],
    coerce_mr: bool,
    extra_args: Sequence[str] = (),
) -> list[str]:
    lines = [
        f'[listen]\nhost = "{HOST}"\nport = {port}\naet = "ROUTER"\n',
        f'[queue]\nfolder = "{workdir / "queue"}"\n',
    ]
    for name, (aet, dport) in destinations.items():
        lines.append(
            f'[[destination]]\nname = "{name}"\naet = "{aet}"\nhost = "{HOST}"\n'
            f"port = {dport}\nassociations = 2\nbackoff = 0.2\nmax_backoff = 1.0\n"
        )
    lines.append('[[rule]]\nmatch = { Modality = "CT" }\nforward = ["dcmtk"]\n')
    lines.append('[[rule]]\nmatch = { Modality = "MR" }\nforward = ["archive"]\n')
    if coerce_mr:
        lines.append(
            '[[rule]]\nmatch = { Modality = "MR" }\nforward = ["dcmtk"]\n'
            'set = { InstitutionName = "ROUTED" }\n'
        )
    config = workdir / "route.toml"
    config.write_text("\n".join(lines))
    return [*dicomnet_command(), "route", "--config", str(config), "-v", *extra_args]


def start_route(
    workdir: Path,
    destinations: dict[str, tuple[str, int]],
    port: int | None = None,
    coerce_mr: bool = False,
    extra_args: Sequence[str] = (),
) -> tuple[ManagedProcess, int]:
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / f"route-{len(list(workdir.glob('route-*.log')))}.log"
    env = dicomnet_env(workdir / "tmp")
    if port is None:
        return start_listening_process(
            "dicomnet route",
            lambda p: route_argv(workdir, p, destinations, coerce_mr, extra_args),
            log,
            env=env,
            cwd=REPO_ROOT,
        )
    process = ManagedProcess(
        "dicomnet route",
        route_argv(workdir, port, destinations, coerce_mr),
        log,
        env=env,
        cwd=REPO_ROOT,
    ).start()
    process.wait_listening(port, 20)
    return process, port


def send_at_once(port: int, batches: list[list[Path]]) -> None:
    """One storescu per batch, all at the same time."""
    results: list[object] = []

    def send(batch: list[Path]) -> None:
        results.append(storescu(port, batch, aec="ROUTER"))

    threads = [threading.Thread(target=send, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for result in results:
        assert result.returncode == 0, result  # type: ignore[attr-defined]


def institution_name_set_to(data: bytes, value: bytes) -> bytes:
    """`data` (Explicit VR Little Endian) with its Institution Name element's value replaced
    by bytes, and nothing else touched: what a coercion may change."""
    tag = b"\x08\x00\x80\x00LO"
    at = data.index(tag)
    length = int.from_bytes(data[at + 6 : at + 8], "little")
    value += b" " * (len(value) % 2)
    return data[: at + 6] + len(value).to_bytes(2, "little") + value + data[at + 8 + length :]


@pytest.mark.timeout(180)
def test_each_instance_reaches_the_destinations_of_its_rules_byte_identical(
    tmp_path: Path,
    storescp: Callable[..., StoreSCP],
    dicomnet_server: Callable[..., DicomnetServer],
) -> None:
    """CT to storescp, MR to serve as received and to storescp with Institution Name set."""
    cts = instances(tmp_path / "in", "CT_small.dcm", 12)
    mrs = instances(tmp_path / "in", "MR_small.dcm", 12)
    dcmtk = storescp(aet="STORESCP")  # +B: files hold the data set bytes as received
    archive = dicomnet_server(aet="ARCHIVE")
    router, port = start_route(
        tmp_path / "route",
        {"dcmtk": ("STORESCP", dcmtk.port), "archive": ("ARCHIVE", archive.port)},
        coerce_mr=True,
    )
    uid = {p: str(dcmread(p).SOPInstanceUID) for p in cts + mrs}
    try:
        send_at_once(port, [cts[i : i + 4] + mrs[i : i + 4] for i in (0, 4, 8)])
        received = dcmtk.wait_received(24, timeout=30)
        stored = archive.wait_stored([uid[p] for p in mrs], timeout=30)
    finally:
        router.stop()
    assert set(received) == set(uid.values()), router.log_text()
    assert set(stored) == {uid[p] for p in mrs}  # no CT went to serve
    for p in cts:
        assert dataset_bytes(received[uid[p]]) == dataset_bytes(p)
    for p in mrs:
        assert dataset_bytes(stored[uid[p]]) == dataset_bytes(p)
        coerced = institution_name_set_to(dataset_bytes(p), b"ROUTED")
        assert dataset_bytes(received[uid[p]]) == coerced


@pytest.mark.timeout(180)
def test_a_destination_down_and_a_kill_9_lose_nothing_and_send_nothing_twice(
    tmp_path: Path, storescp: Callable[..., StoreSCP]
) -> None:
    cts = instances(tmp_path / "in", "CT_small.dcm", 20)
    down = free_port()  # the destination is not there yet
    destinations = {"dcmtk": ("STORESCP", down), "archive": ("ARCHIVE", free_port())}
    router, port = start_route(tmp_path / "route", destinations)
    send_at_once(port, [cts[:10], cts[10:]])  # all acknowledged: queued on disk
    assert router.proc is not None
    router.proc.send_signal(signal.SIGKILL)
    router.proc.wait(10)
    pending = tmp_path / "route" / "queue" / "dcmtk" / "pending"
    assert len(list(pending.glob("*.dcm"))) == 20
    # The destination comes up (unique file names: a second copy would show), the router
    # comes back on its port.
    dcmtk = storescp(aet="STORESCP", port=down, extra_args=["+uf"])
    router, _ = start_route(tmp_path / "route", destinations, port=port)
    try:
        assert wait_until(lambda: len(list(dcmtk.out_dir.rglob("*"))) >= 20, 60)
        assert wait_until(lambda: not list(pending.glob("*.dcm")), 30)
    finally:
        router.stop()
    files = [p for p in dcmtk.out_dir.rglob("*") if p.is_file()]
    assert len(files) == 20, router.log_text()
    assert {str(dcmread(p).SOPInstanceUID) for p in files} == {
        str(dcmread(p).SOPInstanceUID) for p in cts
    }
    assert index_part10_tree(dcmtk.out_dir)


@pytest.mark.timeout(180)
def test_the_metrics_count_what_was_received_queued_and_forwarded(
    tmp_path: Path, storescp: Callable[..., StoreSCP]
) -> None:
    cts = instances(tmp_path / "in", "CT_small.dcm", 6)
    mrs = instances(tmp_path / "in", "MR_small.dcm", 2)
    down, metrics_port = free_port(), free_port()
    destinations = {"dcmtk": ("STORESCP", down), "archive": ("ARCHIVE", free_port())}
    router, port = start_route(
        tmp_path / "route", destinations, extra_args=["--metrics-port", str(metrics_port)]
    )
    try:
        send_at_once(port, [cts[:3], cts[3:]])  # CTs to dcmtk, which is down
        waiting = scrape_metrics(metrics_port)
        dcmtk = storescp(aet="STORESCP", port=down)
        assert wait_until(lambda: len(dcmtk.received()) == 6, 60)
        assert wait_until(
            lambda: (
                metric_sample(
                    scrape_metrics(metrics_port),
                    "dicomnet_route_forwarded_total",
                    destination="dcmtk",
                )
                == 6
            ),
            10,
        )
        send_at_once(port, [mrs])  # MRs to archive, which is never there
        done = scrape_metrics(metrics_port)
    finally:
        router.stop()

    def dcmtk_queue(samples: dict[object, float], name: str) -> float:
        return metric_sample(samples, name, destination="dcmtk")

    assert metric_sample(waiting, "dicomnet_route_received_total", outcome="queued") == 6
    assert dcmtk_queue(waiting, "dicomnet_route_queued") == 6
    assert dcmtk_queue(waiting, "dicomnet_route_oldest_age_seconds") > 0
    assert dcmtk_queue(waiting, "dicomnet_route_forwarded_total") == 0
    assert metric_sample(done, "dicomnet_route_received_total", outcome="queued") == 8
    assert dcmtk_queue(done, "dicomnet_route_queued") == 0
    assert dcmtk_queue(done, "dicomnet_route_retries_total") >= 1  # it was down
    assert metric_sample(done, "dicomnet_route_queued", destination="archive") == 2
    success = {"service": "store", "command": "C-STORE", "category": "success", "status": "0x0000"}
    assert metric_sample(done, "dicomnet_operations_total", role="SCP", **success) == 8
    assert metric_sample(done, "dicomnet_operations_total", role="SCU", **success) == 6
    sent = metric_sample(done, "dicomnet_sent_bytes_total", command="C-STORE", role="SCU")
    assert sent == sum(len(dataset_bytes(p)) for p in cts)
    accepted = {"role": "acceptor", "outcome": "released"}
    assert metric_sample(done, "dicomnet_associations_total", **accepted) == 3
