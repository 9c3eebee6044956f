"""`dicomnet bench` against in-process SCPs on loopback: counts, durations, failures, output."""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

import dicomnet
from dicomnet.cli import bench

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(60)]

LATENCY_KEYS = ("p50", "p90", "p99", "max", "mean")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def bench_args(*argv: str) -> argparse.Namespace:
    """Parse `dicomnet bench ARGV...` with a parser built by `add_parser`."""
    parser = argparse.ArgumentParser(prog="dicomnet")
    sub = parser.add_subparsers(dest="command", required=True)
    returned = bench.add_parser(sub)
    assert returned.prog.endswith("bench")
    return parser.parse_args(["bench", *argv])


async def run_json(
    capsys: pytest.CaptureFixture[str], port: int, *argv: str
) -> tuple[int, dict[str, Any]]:
    code = await bench.run(bench_args("127.0.0.1", str(port), "--aec", "PACS", "--json", *argv))
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1, out
    return code, json.loads(out[0])


def check_latency(result: dict[str, Any]) -> None:
    latency = result["latency_ms"]
    assert set(latency) == set(LATENCY_KEYS)
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert latency["mean"] <= latency["max"]


def counting_ae(status: int = 0x0000) -> tuple[dicomnet.AE, list[str], list[str]]:
    """An SCP recording SOP Instance UIDs (command, data set) and answering `status`."""
    ae = dicomnet.AE("PACS")
    commanded: list[str] = []
    in_dataset: list[str] = []

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        commanded.append(request.sop_instance_uid)
        in_dataset.append(str(request.dataset.SOPInstanceUID))
        return status

    return ae, commanded, in_dataset


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --- the command line -------------------------------------------------------------------------


def test_parser_defaults_and_choices() -> None:
    args = bench_args("pacs.example", "104", "--op", "echo")
    assert (args.host, args.port, args.op) == ("pacs.example", 104, "echo")
    assert (args.aet, args.aec) == ("DICOMNET", "ANY-SCP")
    assert (args.timeout, args.dimse_timeout) == (30.0, 60.0)
    assert (args.concurrency, args.count, args.duration) == (1, 1000, None)
    assert (args.size, args.files, args.per_association) == (None, None, 0)
    assert not (args.json or args.no_progress or args.verbose or args.debug)
    args = bench_args("h", "1", "--op", "store", "--size", "512K", "--duration", "2.5", "-v")
    assert (args.size, args.duration, args.verbose) == (512 * 1024, 2.5, True)


@pytest.mark.parametrize(
    "argv",
    [
        ["h", "1"],  # --op is required
        ["h", "1", "--op", "find"],
        ["h", "1", "--op", "echo", "--count", "5", "--duration", "1"],  # exclusive
        ["h", "1", "--op", "echo", "--concurrency", "0"],
        ["h", "1", "--op", "echo", "--duration", "0"],
        ["h", "1", "--op", "store", "--size", "12X"],
        ["h", "1", "--op", "echo", "--per-association", "-1"],
    ],
)
def test_parser_refuses(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench_args(*argv)
    assert info.value.code == 2
    assert "error" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "size"),
    [("2048", 2048), ("1K", 1024), ("512k", 524288), ("1M", 1 << 20), ("1.5MiB", 3 << 19)],
)
def test_parse_size(text: str, size: int) -> None:
    assert bench.parse_size(text) == size


def test_results_percentiles_are_nearest_rank() -> None:
    results = bench.Results("echo", 1, started=0.0, finished=2.0)
    for ms in range(1, 101):  # 1..100 ms
        results.success(dicomnet.Status(0), ms / 1000, 0)
    results.failure("A700", 0.5)
    summary = results.summary()
    latency = summary["latency_ms"]
    assert latency["p50"] == pytest.approx(51)  # 101 samples: rank 51
    assert latency["p90"] == pytest.approx(91)
    assert latency["p99"] == pytest.approx(100)
    assert latency["max"] == pytest.approx(500)
    assert summary["operations"] == 101 and summary["failed"] == 1
    assert summary["failures"] == {"A700": 1}
    assert summary["ops_per_s"] == pytest.approx(50)  # successful operations / elapsed
    assert summary["mb_per_s"] is None


# --- against a live SCP -----------------------------------------------------------------------


async def test_echo_count_concurrency(capsys: pytest.CaptureFixture[str]) -> None:
    ae = dicomnet.AE("PACS")
    echoes = 0

    @ae.on_echo
    async def echo(request: dicomnet.EchoRequest) -> int:
        nonlocal echoes
        echoes += 1
        return 0

    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(
            capsys, server.port, "--op", "echo", "--count", "200", "--concurrency", "4"
        )
    assert code == 0
    assert echoes == 200
    assert result["op"] == "echo" and result["concurrency"] == 4
    assert (result["operations"], result["succeeded"], result["failed"]) == (200, 200, 0)
    assert result["failures"] == {}
    assert result["associations"] == 4
    assert result["elapsed_s"] > 0
    assert result["ops_per_s"] == pytest.approx(200 / result["elapsed_s"])
    assert result["mb_per_s"] is None
    check_latency(result)


async def test_store_generated_instances_are_distinct(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ae, commanded, in_dataset = counting_ae()
    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(
            capsys,
            server.port,
            "--op",
            "store",
            "--count",
            "50",
            "--size",
            "1K",
            "--concurrency",
            "2",
        )
    assert code == 0
    assert (result["operations"], result["succeeded"], result["failed"]) == (50, 50, 0)
    assert len(set(commanded)) == 50
    # The data set carries the same (rewritten) UID as the command.
    assert sorted(in_dataset) == sorted(commanded)
    assert result["associations"] == 2
    # Each data set holds 1 KiB of pixel data plus its attributes.
    assert 50 * 1024 < result["bytes"] < 50 * 2048
    assert result["mb_per_s"] == pytest.approx(result["bytes"] / 1e6 / result["elapsed_s"])
    check_latency(result)


async def test_generated_instance_is_valid_secondary_capture(tmp_path: Path) -> None:
    ae = dicomnet.AE("PACS")
    saved: list[Path] = []

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        saved.append(await request.save(tmp_path / f"{request.sop_instance_uid}.dcm"))
        return 0

    async with ae.serve("127.0.0.1", 0) as server:
        args = bench_args(
            "127.0.0.1", str(server.port), "--op", "store", "--count", "3", "--size", "2048"
        )
        args.json = True
        assert await bench.run(args) == 0
    assert len(saved) == 3
    ds = dcmread(saved[1])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID == saved[1].stem
    assert (ds.PhotometricInterpretation, ds.BitsAllocated, ds.SamplesPerPixel) == (
        "MONOCHROME2",
        8,
        1,
    )
    assert ds.Rows * ds.Columns == len(ds.PixelData) == 2048
    assert ds.pixel_array.shape == (ds.Rows, ds.Columns)


async def test_duration(capsys: pytest.CaptureFixture[str]) -> None:
    async with dicomnet.AE("PACS").serve("127.0.0.1", 0) as server:
        code, result = await run_json(
            capsys, server.port, "--op", "echo", "--duration", "1", "--concurrency", "2"
        )
    assert code == 0
    assert result["operations"] > 0 and result["failed"] == 0
    assert 1.0 <= result["elapsed_s"] < 5.0
    check_latency(result)


async def test_per_association(capsys: pytest.CaptureFixture[str]) -> None:
    ae = dicomnet.AE("PACS")
    admitted = 0

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        nonlocal admitted
        admitted += 1

    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(
            capsys, server.port, "--op", "echo", "--count", "30", "--concurrency", "3",
            "--per-association", "1",
        )  # fmt: skip
        code2, result2 = await run_json(
            capsys, server.port, "--op", "echo", "--count", "30", "--per-association", "7"
        )
    assert (code, code2) == (0, 0)
    assert result["associations"] == 30 and result["succeeded"] == 30
    assert result2["associations"] == 5 and result2["succeeded"] == 30  # 7+7+7+7+2
    assert admitted == 35


async def test_refusing_server(capsys: pytest.CaptureFixture[str]) -> None:
    ae, commanded, _ = counting_ae(status=0xA700)
    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(
            capsys, server.port, "--op", "store", "--count", "12", "--concurrency", "2"
        )
    assert code == 1
    assert (result["operations"], result["succeeded"], result["failed"]) == (12, 0, 12)
    assert result["failures"] == {"A700": 12}
    assert len(commanded) == 12
    assert result["ops_per_s"] == 0
    # Refusals are still answered operations: their latency is measured, and the
    # association survives them.
    check_latency(result)
    assert result["associations"] == 2 and result["association_failures"] == 0


async def test_warning_status(capsys: pytest.CaptureFixture[str]) -> None:
    ae, _, _ = counting_ae(status=0xB000)
    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(capsys, server.port, "--op", "store", "--count", "5")
    assert code == 0
    assert (result["succeeded"], result["warnings"], result["failed"]) == (0, 5, 0)
    assert result["warning_statuses"] == {"B000": 5}


async def test_closed_port(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code, result = await run_json(capsys, port, "--op", "echo", "--count", "5")
    assert code == 1
    assert (result["operations"], result["failed"]) == (5, 5)
    assert result["failures"] == {"connection-failed": 5}
    assert result["associations"] == 0 and result["association_failures"] == 5
    assert result["latency_ms"] == dict.fromkeys(LATENCY_KEYS)


async def test_closed_port_workers_give_up(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    code, result = await run_json(
        capsys, port, "--op", "echo", "--count", "100", "--concurrency", "2"
    )
    assert code == 1
    # Each worker stops after 10 association failures in a row; the rest is never tried.
    assert result["failures"] == {"connection-failed": 20, "not-attempted": 80}
    assert result["failed"] == result["operations"] == 100


async def test_rejected_association(capsys: pytest.CaptureFixture[str]) -> None:
    ae = dicomnet.AE("PACS")

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        raise dicomnet.Reject(1, 1, 3)  # calling AE title not recognized

    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(capsys, server.port, "--op", "echo", "--count", "4")
    assert code == 1
    assert result["failures"] == {"rejected": 4}


async def test_aborted_association_reconnects(capsys: pytest.CaptureFixture[str]) -> None:
    ae = dicomnet.AE("PACS")
    calls = 0

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            await request.association.abort()
        return 0

    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(capsys, server.port, "--op", "store", "--count", "10")
    assert code == 1
    assert result["failures"] == {"aborted": 1}
    assert (result["succeeded"], result["failed"]) == (9, 1)
    assert result["associations"] == 2 and result["association_failures"] == 1


async def test_store_files_cycle(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ae, commanded, _ = counting_ae()
    ct = str(get_testdata_file("CT_small.dcm"))
    mr = str(get_testdata_file("MR_small.dcm"))
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "notes.txt").write_text("not DICOM")
    (folder / "mr.dcm").write_bytes(Path(mr).read_bytes())
    async with ae.serve("127.0.0.1", 0) as server:
        code, result = await run_json(
            capsys, server.port, "--op", "store", "--count", "6", "--files", ct, str(folder)
        )
    assert code == 0
    assert result["succeeded"] == 6
    uids = Counter(commanded)
    assert uids == {
        str(dcmread(ct).SOPInstanceUID): 3,
        str(dcmread(mr).SOPInstanceUID): 3,
    }


async def test_store_files_missing(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = bench_args("127.0.0.1", "1", "--op", "store", "--files", str(tmp_path / "nope"))
    assert await bench.run(args) == 2
    assert "no such file" in capsys.readouterr().err


async def test_table_output(capsys: pytest.CaptureFixture[str]) -> None:
    ae, _, _ = counting_ae()
    async with ae.serve("127.0.0.1", 0) as server:
        args = bench_args(
            "127.0.0.1", str(server.port), "--aec", "PACS", "--op", "store", "--count", "20",
            "--size", "4K", "--concurrency", "2",
        )  # fmt: skip
        assert await bench.run(args) == 0
    out = capsys.readouterr().out
    assert f"store to PACS@127.0.0.1:{server.port}, concurrency 2" in out
    assert "operations    20 (succeeded 20, warnings 0, failed 0)" in out
    assert "MB/s" in out and "ops/s" in out
    assert "p50" in out and "p99" in out and "max" in out
    assert "associations  2" in out
    assert "failures      none" in out


async def test_progress_on_a_terminal(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    async with dicomnet.AE("PACS").serve("127.0.0.1", 0) as server:
        args = bench_args(
            "127.0.0.1", str(server.port), "--op", "echo", "--duration", "0.5", "--json"
        )
        assert await bench.run(args) == 0
        err = capsys.readouterr().err
        assert "\r" in err and "/0.5 s" in err and "ops/s" in err and "failed 0" in err
        # At most ten redraws a second (plus the final one).
        assert 2 <= err.count("\r") <= 8

        args.no_progress = True
        assert await bench.run(args) == 0
        assert capsys.readouterr().err == ""


async def test_interrupt_prints_what_was_measured(capsys: pytest.CaptureFixture[str]) -> None:
    async with dicomnet.AE("PACS").serve("127.0.0.1", 0) as server:
        args = bench_args(
            "127.0.0.1", str(server.port), "--op", "echo", "--duration", "30", "--json"
        )
        async with anyio.create_task_group() as tg:

            async def interrupt() -> None:
                await anyio.sleep(0.5)
                os.kill(os.getpid(), signal.SIGINT)

            tg.start_soon(interrupt)
            with anyio.fail_after(10):
                code = await bench.run(args)
    assert code == 130
    result = json.loads(capsys.readouterr().out)
    assert result["interrupted"] is True
    assert result["operations"] > 0 and result["failed"] == 0
    assert 0.4 < result["elapsed_s"] < 10


async def test_context_not_accepted(capsys: pytest.CaptureFixture[str]) -> None:
    # No on_store: the SCP accepts Verification only, so every C-STORE fails locally,
    # without I/O; the duration must still be honoured.
    async with dicomnet.AE("PACS").serve("127.0.0.1", 0) as server:
        with anyio.fail_after(10):
            code, result = await run_json(capsys, server.port, "--op", "store", "--duration", "0.3")
    assert code == 1
    assert result["operations"] == result["failed"] > 0
    assert list(result["failures"]) == ["not-negotiated"]
    assert result["associations"] == 1 and result["association_failures"] == 0
    assert 0.3 <= result["elapsed_s"] < 5


async def test_generated_instances_are_one_bench_patient_and_study_per_run(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    ae = dicomnet.AE("PACS")
    saved: list[Path] = []

    @ae.on_store
    async def store(request: dicomnet.StoreRequest) -> int:
        saved.append(await request.save(tmp_path / f"{request.sop_instance_uid}.dcm"))
        return 0

    async with ae.serve("127.0.0.1", 0) as server:
        args = bench_args("127.0.0.1", str(server.port), "--op", "store", "--count", "3")
        assert await bench.run(args) == 0
        table = capsys.readouterr().out
        code, result = await run_json(capsys, server.port, "--op", "store", "--count", "2")
        assert code == 0 and result["succeeded"] == 2
    datasets = [dcmread(path) for path in saved]
    assert {(str(ds.PatientID), str(ds.PatientName)) for ds in datasets} == {
        ("DICOMNET-BENCH", "DICOMNET^BENCH")
    }
    first, second = (
        {str(ds.StudyInstanceUID) for ds in datasets[:3]},
        {str(ds.StudyInstanceUID) for ds in datasets[3:]},
    )
    assert len(first) == len(second) == 1 and first != second  # a study per run
    (study,) = first
    assert (
        f"  stored        test instances: patient DICOMNET-BENCH (DICOMNET^BENCH), study {study}"
        in table
    )
    assert f"  to remove     dicomnet delete --storage DIR --study-uid {study}\n" in table


async def test_the_removal_note_stays_out_of_json(
    capsys: pytest.CaptureFixture[str],
) -> None:
    ae, _, _ = counting_ae()
    async with ae.serve("127.0.0.1", 0) as server:
        args = bench_args("127.0.0.1", str(server.port), "--aec", "PACS", "--op", "store",
                          "--count", "2", "--json")  # fmt: skip
        assert await bench.run(args) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["succeeded"] == 2
    assert "dicomnet delete --storage DIR --study-uid" in captured.err


def test_help_says_store_leaves_instances_in_the_pacs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        bench_args("--help")
    out = " ".join(capsys.readouterr().out.split())
    assert "--op store stores test instances in the target PACS" in out
    assert "DICOMNET-BENCH" in out and "dicomnet delete --bench" in out
