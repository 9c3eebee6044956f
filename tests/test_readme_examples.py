"""Every ```python block of README.md runs as written; every ```toml block parses.

How a block is found: by the `<!-- readme-example: NAME -->` line just above it. Each
NAME is either run by the test of the same name below (RUN) or listed in NOT_RUN with the
reason; a python block without a marker, or with a NAME in neither, fails
`test_every_python_block_is_run_or_listed`.

How a block gets its peers (the one substitution made): README.md addresses everything at
127.0.0.1 with fixed ports, 11112 the PACS (`dicomnet serve --aet PACS`, or the block's
own server), 11113 a listener of ours (AE title ME), 2762 the TLS block's server. Before a
block runs, each of these port numbers, as a whole word, is replaced by a free port on
loopback; nothing else in the block is changed. The block is then written to a file and
run with this Python (a subprocess with a timeout; a non-zero exit, i.e. an example that
raises, fails the test) in a folder holding the files the README names: `image.dcm` and
`a.dcm` (pydicom's CT_small.dcm, patient 1CT1), `b.dcm` (MR_small.dcm), and for the TLS
block `ca.pem`, `pacs.crt`/`pacs.key`, `me.crt`/`me.key` made by tests/tls_certs.py.

The peers are `dicomnet serve` processes started here, as the README's Python API section
says: PACS (holding CT_small.dcm, knowing ARCHIVE and ME as peers) and ARCHIVE (a move
destination); both are stopped at the end. The SCP block is a server: it is started,
exercised with the `dicomnet` commands (echo, store, find, get, get --via move), then
stopped with SIGTERM and must exit cleanly.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file

from dicomnet.access import load_access
from dicomnet.route.config import parse_config

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HOST = "127.0.0.1"
PORTS = ("11112", "11113", "2762")  # rewritten to free ports, see the module docstring
TIMEOUT = 60.0

CT = get_testdata_file("CT_small.dcm")
MR = get_testdata_file("MR_small.dcm")
CT_UID = str(dcmread(CT, stop_before_pixels=True).SOPInstanceUID)
CT_STUDY = str(dcmread(CT, stop_before_pixels=True).StudyInstanceUID)
MR_UID = str(dcmread(MR, stop_before_pixels=True).SOPInstanceUID)

MARKER = re.compile(r"<!-- readme-example: ([\w-]+) -->\n$")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.S | re.M)

# Python blocks that are not run, and why (none today).
NOT_RUN: dict[str, str] = {}
RUN = ("echo-store", "query-retrieve", "scp", "n-services", "commitment", "tls", "pool")


@dataclass(frozen=True)
class Block:
    language: str
    name: str | None  # from the marker line above it
    code: str


def blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    found = []
    for match in FENCE.finditer(text):
        before = text[: match.start()]
        marker = MARKER.search(before[before.rfind("\n", 0, len(before) - 1) + 1 :])
        found.append(Block(match.group(1), marker.group(1) if marker else None, match.group(2)))
    return found


def python_block(name: str) -> str:
    (code,) = [b.code for b in blocks() if b.language == "python" and b.name == name]
    return code


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def rewrite(code: str, ports: dict[str, int]) -> str:
    for number in PORTS:
        code = re.sub(rf"\b{number}\b", str(ports[number]), code)
    return code


def run_block(name: str, folder: Path, ports: dict[str, int]) -> str:
    script = folder / f"readme_{name.replace('-', '_')}.py"
    script.write_text(rewrite(python_block(name), ports), encoding="utf-8")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert result.returncode == 0, f"README block {name!r} failed:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout


def dicomnet_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "dicomnet", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    if check:
        assert result.returncode == 0, f"dicomnet {' '.join(args)}:\n{result.stderr}"
    return result


def wait_for_line(process: subprocess.Popen[str], pattern: str) -> re.Match[str]:
    """The first stdout line of `process` matching `pattern` (within TIMEOUT)."""
    assert process.stdout is not None
    deadline = time.monotonic() + TIMEOUT
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=deadline - time.monotonic()):
                break
            line = process.stdout.readline()
            if not line:
                break
            match = re.search(pattern, line)
            if match:
                return match
    raise AssertionError(f"no line matching {pattern!r} from {process.args}")


def stop(process: subprocess.Popen[str]) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def start_serve(folder: Path, aet: str, *peers: str) -> tuple[subprocess.Popen[str], int]:
    args = ["serve", "--aet", aet, "--port", "0", "--storage", str(folder / aet.lower())]
    for peer in peers:
        args += ["--peer", peer]
    process = subprocess.Popen(
        [sys.executable, "-m", "dicomnet", *args, "--no-fsync"],
        stdout=subprocess.PIPE,
        stderr=(folder / f"{aet.lower()}.log").open("w"),
        text=True,
    )
    try:
        port = int(wait_for_line(process, rf"{aet} listening on [\d.]+:(\d+)").group(1))
    except BaseException:
        stop(process)
        raise
    return process, port


@dataclass(frozen=True)
class Peers:
    ports: dict[str, int]  # README port -> the one used here
    archive: Path  # what ARCHIVE stores


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    """PACS (`dicomnet serve --aet PACS`, holding CT_small.dcm) and ARCHIVE."""
    folder = tmp_path_factory.mktemp("readme-peers")
    listener = free_port()  # where the blocks' ME listens (README: 11113)
    archive, archive_port = start_serve(folder, "ARCHIVE")
    try:
        pacs, pacs_port = start_serve(
            folder, "PACS", f"ARCHIVE={HOST}:{archive_port}", f"ME={HOST}:{listener}"
        )
        try:
            dicomnet_cmd("store", HOST, str(pacs_port), CT, "--aec", "PACS", "--no-progress")
            ports = {"11112": pacs_port, "11113": listener, "2762": free_port()}
            yield Peers(ports, folder / "archive")
        finally:
            assert stop(pacs) == 0
    finally:
        assert stop(archive) == 0


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """The folder a block runs in, with the files the README names."""
    shutil.copy(CT, tmp_path / "image.dcm")
    shutil.copy(CT, tmp_path / "a.dcm")
    shutil.copy(MR, tmp_path / "b.dcm")
    return tmp_path


def test_every_python_block_is_run_or_listed() -> None:
    names = [b.name for b in blocks() if b.language == "python"]
    assert None not in names, "a ```python block in README.md has no readme-example marker"
    assert len(names) == len(set(names)), f"a marker is used twice: {names}"
    unknown = set(names) - set(RUN) - set(NOT_RUN)
    assert not unknown, f"README blocks neither run nor listed in NOT_RUN: {sorted(unknown)}"
    assert set(RUN) <= set(names), f"blocks gone from README.md: {set(RUN) - set(names)}"
    for name in RUN:  # each name in RUN has its test below
        assert f"test_{name.replace('-', '_')}" in globals()


def test_toml_blocks_parse(tmp_path: Path) -> None:
    tomls = [b.code for b in blocks() if b.language == "toml"]
    assert tomls
    for number, code in enumerate(tomls):
        config = tomllib.loads(code)
        if "destination" in config:  # a `route --config FILE`
            assert parse_config(config).destinations
        elif "rule" in config:  # an access policy (`serve --access FILE`): load it as serve does
            path = tmp_path / f"access-{number}.toml"
            path.write_text(code, encoding="utf-8")
            assert load_access(path) is not None


@pytest.mark.timeout(120)
def test_echo_store(peers: Peers, workdir: Path) -> None:
    out = run_block("echo-store", workdir, peers.ports)
    assert "C-STORE: Success" in out


@pytest.mark.timeout(120)
def test_query_retrieve(peers: Peers, workdir: Path) -> None:
    out = run_block("query-retrieve", workdir, peers.ports)
    assert "1 studies" in out
    assert "moved: 1 failed: 0" in out
    assert f"got {CT_UID}" in out and f"retrieved {CT_UID}" in out
    assert (workdir / f"{CT_UID}.dcm").read_bytes()[128:132] == b"DICM"
    assert (peers.archive / f"{CT_UID}.dcm").exists()  # where the C-MOVE sent it


@pytest.mark.timeout(120)
def test_pool(peers: Peers, workdir: Path) -> None:
    out = run_block("pool", workdir, peers.ports)
    for path in ("a.dcm", "b.dcm", "image.dcm"):
        assert f"{path} Success" in out
    opened = re.search(r"opened=(\d+), open=(\d+), sent=(\d+), failed=(\d+)", out)
    assert opened is not None, out
    assert 1 <= int(opened.group(1)) <= 2 and opened.group(3, 4) == ("3", "0")


@pytest.mark.timeout(120)
def test_commitment(peers: Peers, workdir: Path) -> None:
    out = run_block("commitment", workdir, peers.ports)
    assert CT_UID in out and MR_UID in out
    assert "failed: ()" in out


@pytest.mark.timeout(120)
def test_n_services(workdir: Path) -> None:
    ports = {number: free_port() for number in PORTS}
    out = run_block("n-services", workdir, ports)
    assert "N-GET: Success NORMAL" in out
    assert "N-EVENT-REPORT 1 READY" in out
    assert "N-ACTION: Success" in out


@pytest.mark.timeout(120)
def test_tls(workdir: Path) -> None:
    from tests.tls_certs import make_pki

    pki = make_pki(workdir / "pki")
    for source, name in (
        (pki.ca, "ca.pem"),
        (pki.server.cert, "pacs.crt"),
        (pki.server.key, "pacs.key"),
        (pki.client.cert, "me.crt"),
        (pki.client.key, "me.key"),
    ):
        shutil.copy(source, workdir / name)
    ports = {number: free_port() for number in PORTS}
    out = run_block("tls", workdir, ports)
    assert "C-ECHO over TLS: Success" in out
    assert "client certificate: " in out and "CN=modality-1" in out
    assert "server certificate: " in out and "CN=dicomnet-server" in out


@pytest.mark.timeout(180)
def test_scp(workdir: Path) -> None:
    ports = {number: free_port() for number in PORTS}
    port, listener = str(ports["11112"]), str(ports["11113"])
    script = workdir / "readme_scp.py"
    script.write_text(rewrite(python_block("scp"), ports), encoding="utf-8")
    server = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=workdir,
        stdout=subprocess.PIPE,
        stderr=(workdir / "scp.log").open("w"),
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for_line(server, rf"listening on 127\.0\.0\.1:{port}")
        scu = ("--aec", "PACS", "--aet", "CT1")
        dicomnet_cmd("echo", HOST, port, *scu)
        refused = dicomnet_cmd("echo", HOST, port, "--aec", "PACS", "--aet", "X", check=False)
        assert refused.returncode == 1 and "reject" in refused.stderr.lower()
        dicomnet_cmd("store", HOST, port, CT, MR, *scu, "--no-progress")
        assert (workdir / "received" / f"{CT_UID}.dcm").exists()

        found = dicomnet_cmd(
            "find", HOST, port, *scu, "--json", "-k", "PatientID=1CT1", "-k", "StudyInstanceUID"
        ).stdout.splitlines()
        assert len(found) == 1, found
        assert json.loads(found[0])["0020000D"]["Value"] == [CT_STUDY]

        key = ("-k", f"StudyInstanceUID={CT_STUDY}", "--aec", "PACS", "--aet", "VIEWER")
        dicomnet_cmd("get", HOST, port, *key, "--out", str(workdir / "by-get"))
        assert (workdir / "by-get" / f"{CT_UID}.dcm").exists()
        dicomnet_cmd(
            "get",
            HOST,
            port,
            *key,
            "--out",
            str(workdir / "by-move"),
            "--via",
            "move",
            "--listen-host",
            HOST,
            "--listen-port",
            listener,
        )
        assert (workdir / "by-move" / f"{CT_UID}.dcm").exists()
    finally:
        code = stop(server)
    log = (workdir / "scp.log").read_text()
    assert code == 0, log
    assert "Traceback" not in log, log
