"""Query/Retrieve peers for the end-to-end tests, built on ``peers.py``.

- DCMTK ``dcmqrscp`` configured by the test (storage area indexed with
  ``dcmqridx``, AE title, peer table with the move destinations), single process,
  stopped for sure;
- a pynetdicom Query/Retrieve SCP (C-FIND / C-MOVE / C-GET handlers answering
  from the generated data through ``qr_data.expected_matches``) in a thread;
- wrappers for DCMTK ``findscu`` / ``movescu`` / ``getscu`` (responses parsed
  from ``-X`` files and ``-d`` DIMSE dumps) and for ``dicomnet find / move / get``;
- judging retrieved files: every expected instance, data set byte-identical.

Everything talks to 127.0.0.1 only. Nothing here imports dicomnet.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import qr_data
from peers import (
    HOST,
    VERIFICATION,
    DicomnetServer,
    Expected,
    ManagedProcess,
    ToolResult,
    _dcmtk,
    dcmtk_tool,
    describe_cli,
    free_port,
    index_part10_tree,
    pynetdicom_ae,
    run_dicomnet,
    run_tool,
    start_dicomnet_server,
    start_listening_process,
    verify_part10_received,
)
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

#: Everything the Q/R tests run from DCMTK.
QR_DCMTK_TOOLS = (
    "echoscu", "storescu", "storescp", "findscu", "movescu", "getscu", "dcmqrscp", "dcmqridx",
)  # fmt: skip

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
MODEL_OF_SOP_CLASS = {
    PATIENT_ROOT_FIND: "patient", PATIENT_ROOT_MOVE: "patient", PATIENT_ROOT_GET: "patient",
    STUDY_ROOT_FIND: "study", STUDY_ROOT_MOVE: "study", STUDY_ROOT_GET: "study",
}  # fmt: skip


#: DCMTK's DUL reads this from the environment: with it, DCMTK sends each DIMSE
#: message without the ~40 ms Nagle / delayed-ACK stall per PDU pair (305 sub-
#: operations between dcmqrscp and storescp take 0.4 s instead of 27 s).
DCMTK_ENV = {"TCP_NODELAY": "1"}


@contextlib.contextmanager
def dcmtk_environment() -> Iterator[None]:
    """Set ``DCMTK_ENV`` for every process started meanwhile (then restore)."""
    saved = {k: os.environ.get(k) for k in DCMTK_ENV}
    os.environ.update(DCMTK_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def qr_dcmtk_missing() -> list[str]:
    return [tool for tool in QR_DCMTK_TOOLS if dcmtk_tool(tool) is None]


def require_qr_dcmtk() -> None:
    """Skip (or fail, with ``DICOMNET_REQUIRE_DCMTK=1``) when a DCMTK tool is missing."""
    missing = qr_dcmtk_missing()
    if not missing:
        return
    message = f"DCMTK tools not installed: {', '.join(missing)} (apt-get install dcmtk)"
    if os.environ.get("DICOMNET_REQUIRE_DCMTK"):
        pytest.fail(message)
    pytest.skip(message)


def _model_flag(model: str) -> str:
    return {"patient": "-P", "study": "-S"}[model]


# --------------------------------------------------------------------------
# DCMTK dcmqrscp


#: Return keys dcmqrscp's index does not hold (it leaves them out of responses).
DCMQRSCP_UNSUPPORTED_KEYS = frozenset({"SeriesDescription", "SOPClassUID"})


def without_keys(case: qr_data.QueryCase, unsupported: Iterable[str]) -> qr_data.QueryCase:
    """``case`` minus return keys a peer cannot answer (matching keys must stay)."""
    unsupported = set(unsupported)
    for key in unsupported & case.keys.keys():
        assert case.keys[key] == "", f"{case.name}: {key} is a matching key"
    keys = {k: v for k, v in case.keys.items() if k not in unsupported}
    return qr_data.QueryCase(case.name, case.model, case.level, keys, case.pn_case_sensitive)


@dataclass
class DcmQRSCP:
    process: ManagedProcess
    port: int
    aet: str
    db_dir: Path
    config: Path
    host: str = HOST

    def alive(self) -> bool:
        return self.process.alive()

    def log_text(self, tail: int | None = 20_000) -> str:
        return self.process.log_text(tail)

    def stop(self) -> int | None:
        """Stop the listener, then any child still serving an association (they
        run in the process group the listener leads, started by us)."""
        code = self.process.stop()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return code


def write_dcmqrscp_config(
    path: Path, *, aet: str, db_dir: Path, peers: Mapping[str, tuple[str, int]]
) -> Path:
    """A dcmqrscp configuration: one storage area for ``aet``, ``peers`` as the
    host table (the move destinations, AE title -> (host, port))."""
    lines = [
        "NetworkTCPPort  = 104",  # overridden on the command line
        "MaxPDUSize      = 16384",
        "MaxAssociations = 16",
        "",
        "HostTable BEGIN",
    ]
    for n, (peer_aet, (host, port)) in enumerate(sorted(peers.items())):
        lines.append(f"peer{n} = ({peer_aet}, {host}, {port})")
    lines += [
        "HostTable END",
        "",
        "VendorTable BEGIN",
        "VendorTable END",
        "",
        "AETable BEGIN",
        # title, storage area, access, quota (studies, bytes per study), allowed peers
        f"{aet}  {db_dir}  RW  (1000, 1024mb)  ANY",
        "AETable END",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def start_dcmqrscp(
    workdir: Path,
    files: Iterable[Path],
    *,
    aet: str = "DCMQRSCP",
    peers: Mapping[str, tuple[str, int]] | None = None,
    extra_args: Sequence[str] = (),
    timeout: float = 20.0,
) -> DcmQRSCP:
    """Copy ``files`` into a fresh storage area, index them with dcmqridx and start
    ``dcmqrscp`` on a free port."""
    workdir.mkdir(parents=True, exist_ok=True)
    db_dir = workdir / "db"
    db_dir.mkdir(exist_ok=True)
    copies: list[Path] = []
    for n, src in enumerate(files):
        dst = db_dir / f"in{n:05d}.dcm"
        shutil.copyfile(src, dst)
        copies.append(dst)
    for start in range(0, len(copies), 200):
        r = run_tool([_dcmtk("dcmqridx"), str(db_dir), *map(str, copies[start : start + 200])],
                     timeout=60)  # fmt: skip
        if r.returncode != 0:
            raise AssertionError(f"dcmqridx failed:\n{r}")
    config = write_dcmqrscp_config(workdir / "dcmqrscp.cfg", aet=aet, db_dir=db_dir,
                                   peers=peers or {})  # fmt: skip

    def argv(port: int) -> list[str]:
        # Fork mode (the default): dcmqrscp 3.6.7 --single-process segfaults when
        # the first association is released.
        return [_dcmtk("dcmqrscp"), "-d", "-dhl", "-c", str(config),
                "-ta", "30", "-td", "60", *extra_args, str(port)]  # fmt: skip

    proc, port = start_listening_process(
        "dcmqrscp", argv, workdir / "dcmqrscp.log", timeout=timeout
    )
    return DcmQRSCP(process=proc, port=port, aet=aet, db_dir=db_dir, config=config)


# --------------------------------------------------------------------------
# DCMTK clients


@dataclass
class DimseResponse:
    """One C-MOVE / C-GET response as DCMTK's debug dump shows it."""

    status: int
    remaining: int | None
    completed: int | None
    failed: int | None
    warning: int | None


@dataclass
class FindOutcome:
    result: Any  # ToolResult or CompletedProcess
    identifiers: list[Dataset]

    def rows(self, keys: Iterable[str]) -> list[dict[str, str]]:
        keys = list(keys)
        return [qr_data.identifier_row(ds, keys) for ds in self.identifiers]


@dataclass
class RetrieveOutcome:
    result: Any  # ToolResult or CompletedProcess
    responses: list[DimseResponse] = field(default_factory=list)

    @property
    def final(self) -> DimseResponse | None:
        for rsp in reversed(self.responses):
            if rsp.status not in (0xFF00, 0xFF01):
                return rsp
        return None

    @property
    def pending(self) -> list[DimseResponse]:
        return [r for r in self.responses if r.status in (0xFF00, 0xFF01)]


def _count(text: str) -> int | None:
    text = text.strip()
    if text in ("", "none"):
        return None
    return int(text)


_DIMSE_BLOCK = re.compile(
    r"=+ INCOMING DIMSE MESSAGE =+\n(.*?)\n[^\n]*=+ END DIMSE MESSAGE =+", re.DOTALL
)


def parse_dcmtk_responses(output: str, message_type: str) -> list[DimseResponse]:
    """The ``message_type`` (e.g. ``C-MOVE RSP``) messages of a DCMTK ``-d`` log."""
    out: list[DimseResponse] = []
    for block in _DIMSE_BLOCK.findall(output):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            line = re.sub(r"^[A-Z]: ", "", line)
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip()] = value.strip()
        if fields.get("Message Type") != message_type:
            continue
        status = int(fields["DIMSE Status"].split(":")[0], 16)
        out.append(
            DimseResponse(
                status=status,
                remaining=_count(fields.get("Remaining Suboperations", "none")),
                completed=_count(fields.get("Completed Suboperations", "none")),
                failed=_count(fields.get("Failed Suboperations", "none")),
                warning=_count(fields.get("Warning Suboperations", "none")),
            )
        )
    return out


def findscu(
    port: int,
    keys: Mapping[str, str],
    *,
    level: str,
    model: str,
    out_dir: Path,
    aet: str = "FINDSCU",
    aec: str = "ANY-SCP",
    timeout: float = 60.0,
) -> FindOutcome:
    """findscu with every response extracted (``-X``) and read back."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [_dcmtk("findscu"), "-v", "-to", "10", "-ta", "10", "-td", "30",
            _model_flag(model), "-aet", aet, "-aec", aec, "-X", "-od", str(out_dir),
            *qr_data.key_args(keys, level=level), HOST, str(port)]  # fmt: skip
    result = run_tool(argv, timeout=timeout)
    identifiers = [dcmread(p, force=True) for p in sorted(out_dir.glob("rsp*.dcm"))]
    return FindOutcome(result, identifiers)


def movescu(
    port: int,
    keys: Mapping[str, str],
    *,
    level: str,
    model: str,
    dest: str,
    aet: str = "MOVESCU",
    aec: str = "ANY-SCP",
    timeout: float = 120.0,
) -> RetrieveOutcome:
    argv = [_dcmtk("movescu"), "-d", "-to", "10", "-ta", "10", "-td", "60", _model_flag(model),
            "-aet", aet, "-aec", aec, "-aem", dest, *qr_data.key_args(keys, level=level),
            HOST, str(port)]  # fmt: skip
    result = run_tool(argv, timeout=timeout)
    return RetrieveOutcome(result, parse_dcmtk_responses(result.output, "C-MOVE RSP"))


def getscu(
    port: int,
    keys: Mapping[str, str],
    *,
    level: str,
    model: str,
    out_dir: Path,
    aet: str = "GETSCU",
    aec: str = "ANY-SCP",
    timeout: float = 120.0,
) -> RetrieveOutcome:
    """getscu, bit-preserving (``+B``): received data sets are written as they came."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [_dcmtk("getscu"), "-d", "-to", "10", "-ta", "10", "-td", "60", _model_flag(model),
            "+B", "-od", str(out_dir), "-aet", aet, "-aec", aec,
            *qr_data.key_args(keys, level=level), HOST, str(port)]  # fmt: skip
    result = run_tool(argv, timeout=timeout)
    return RetrieveOutcome(result, parse_dcmtk_responses(result.output, "C-GET RSP"))


def summarize_tool(result: ToolResult, keep: int = 6000) -> str:
    """A DCMTK ``-d`` run without the PDU hex dumps, for assertion messages."""
    lines = [ln for ln in result.output.splitlines() if not re.match(r"^D: +[0-9a-f]{2} ", ln)]
    text = "\n".join(lines)
    if len(text) > keep:
        text = text[: keep // 3] + "\n[...]\n" + text[-2 * keep // 3 :]
    return f"$ {' '.join(result.argv)}\n(exit {result.returncode})\n{text}"


# --------------------------------------------------------------------------
# the dicomnet command line


def dicomnet_find(
    port: int,
    keys: Mapping[str, str],
    *,
    level: str,
    model: str,
    aec: str = "ANY-SCP",
    aet: str = "DNFIND",
    timeout: float = 60.0,
) -> FindOutcome:
    """``dicomnet find --json``: one DICOM JSON object per line on stdout."""
    result = run_dicomnet(
        ["find", HOST, port, "--aet", aet, "--aec", aec, "--model", model, "--level", level,
         "--json", *qr_data.key_args(keys)],
        timeout=timeout,
    )  # fmt: skip
    identifiers: list[Dataset] = []
    for line in result.stdout.splitlines():
        if line.strip():
            identifiers.append(Dataset.from_json(json.loads(line)))
    return FindOutcome(result, identifiers)


_PROGRESS = re.compile(
    r"^(pending|final): remaining (\S+), completed (\S+), failed (\S+), warning (\S+) "
    r"\(Status\(0x([0-9A-Fa-f]{4})"
)


def parse_dicomnet_progress(stdout: str) -> list[DimseResponse]:
    out: list[DimseResponse] = []
    for line in stdout.splitlines():
        m = _PROGRESS.match(line.strip())
        if m:

            def n(text: str) -> int | None:
                return None if text == "None" else int(text)

            out.append(DimseResponse(int(m[6], 16), n(m[2]), n(m[3]), n(m[4]), n(m[5])))
    return out


def dicomnet_move(
    port: int,
    keys: Mapping[str, str],
    *,
    level: str,
    model: str,
    dest: str,
    aec: str = "ANY-SCP",
    aet: str = "DNMOVE",
    timeout: float = 120.0,
) -> RetrieveOutcome:
    result = run_dicomnet(
        ["move", HOST, port, "--aet", aet, "--aec", aec, "--model", model, "--level", level,
         "--dest", dest, "-v", *qr_data.key_args(keys)],  # -v: a line per pending response
        timeout=timeout,
    )  # fmt: skip
    return RetrieveOutcome(result, parse_dicomnet_progress(result.stdout))


_GET_SUMMARY = re.compile(
    r"received (\d+) instance\(s\) into .*; completed (\d+), failed (\d+), warning (\d+); "
    r"final status (?:Status\(0x([0-9A-Fa-f]{4})|None)"
)


def dicomnet_get(
    port: int,
    keys: Mapping[str, str],
    *,
    level: str,
    model: str,
    out_dir: Path,
    aec: str = "ANY-SCP",
    aet: str = "DNGET",
    timeout: float = 120.0,
) -> RetrieveOutcome:
    result = run_dicomnet(
        ["get", HOST, port, "--aet", aet, "--aec", aec, "--model", model, "--level", level,
         "--out", out_dir, *qr_data.key_args(keys)],
        timeout=timeout,
    )  # fmt: skip
    responses: list[DimseResponse] = []
    m = _GET_SUMMARY.search(result.stderr)
    if m and m[5]:
        responses.append(DimseResponse(int(m[5], 16), None, int(m[2]), int(m[3]), int(m[4])))
    return RetrieveOutcome(result, responses)


def describe(outcome: FindOutcome | RetrieveOutcome) -> str:
    result = outcome.result
    if isinstance(result, subprocess.CompletedProcess):
        return describe_cli(result)
    return summarize_tool(result)


# --------------------------------------------------------------------------
# loading a dicomnet serve


def load_server(server: DicomnetServer, data: qr_data.QRData, aec: str) -> None:
    """Store the whole data set into ``server`` with ``dicomnet store`` and check it."""
    r = run_dicomnet(
        ["store", HOST, server.port, "--aec", aec, "--concurrency", "4", data.root], timeout=180
    )
    assert r.returncode == 0, describe_cli(r) + "\n--- server log ---\n" + server.log_text()
    stored = server.wait_stored([i.uid for i in data.instances], timeout=30)
    missing = {i.uid for i in data.instances} - stored.keys()
    assert not missing, f"{len(missing)} instances not stored by {describe_cli(r)}"


def start_qr_server(
    workdir: Path,
    *,
    aet: str,
    peers: Mapping[str, tuple[str, int]] | None = None,
    extra_args: Sequence[str] = (),
) -> DicomnetServer:
    args = [*extra_args]
    for peer_aet, (host, port) in (peers or {}).items():
        args += ["--peer", f"{peer_aet}={host}:{port}"]
    return start_dicomnet_server(workdir, aet=aet, extra_args=args)


# --------------------------------------------------------------------------
# judging retrieved files


def expected_of(instances: Iterable[qr_data.Instance]) -> list[Expected]:
    return [
        Expected(
            uid=i.uid,
            sop_class_uid=i.sop_class_uid,
            transfer_syntax_uid=i.transfer_syntax_uid,
            reference=i.path,
            label=str(i.path.relative_to(i.path.parents[3])),
        )
        for i in instances
    ]


def verify_retrieved(
    instances: Iterable[qr_data.Instance], folder: Path, *, filename_is_uid: bool
) -> list[str]:
    """Every instance in ``folder`` (and nothing else), data sets byte-identical."""
    return verify_part10_received(
        expected_of(instances), index_part10_tree(folder), filename_is_uid=filename_is_uid
    )


def wait_files(folder: Path, count: int, timeout: float = 10.0) -> dict[str, Path]:
    """Wait (bounded) until ``folder`` holds ``count`` Part-10 files."""
    from peers import wait_until

    wait_until(lambda: len(index_part10_tree(folder)) >= count, timeout)
    return index_part10_tree(folder)


# --------------------------------------------------------------------------
# a pynetdicom Query/Retrieve SCP


@dataclass
class PynetdicomQRSCP:
    """A pynetdicom Q/R SCP (Patient and Study Root FIND / MOVE / GET) in a thread.

    It answers from ``data`` with ``qr_data.expected_matches`` (case-sensitive PN),
    sends the generated files (decoded by pydicom and re-encoded in explicit VR
    little endian, their own encoding, so the bytes are the same), and knows
    ``destinations`` (AE title -> (host, port)) as move destinations.
    """

    data: qr_data.QRData
    aet: str = "PYNETQR"
    destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    port: int = 0
    requests: list[tuple[str, str, Dataset]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _server: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _parse(self, event: Any, kind: str) -> tuple[str, str, dict[str, str]]:
        identifier = event.identifier
        model = MODEL_OF_SOP_CLASS[str(event.request.AffectedSOPClassUID)]
        level = str(identifier.get("QueryRetrieveLevel", "")).strip()
        with self._lock:
            self.requests.append((kind, model, identifier))
        known = {k for keys in qr_data.LEVEL_KEYS.values() for k in keys}
        keys = {
            elem.keyword: qr_data.normalise(elem.keyword, elem.value)
            for elem in identifier
            if elem.keyword in known
        }
        return model, level, keys

    def _on_find(self, event: Any) -> Any:
        try:
            model, level, keys = self._parse(event, "find")
            matches = qr_data.expected_matches(self.data, keys, level=level, model=model)
        except Exception as exc:
            self.errors.append(f"find: {exc!r}")
            yield 0xA900, None
            return
        for match in matches:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            rsp = Dataset()
            rsp.QueryRetrieveLevel = level
            for keyword, value in match.items():
                setattr(rsp, keyword, value)
            rsp.RetrieveAETitle = self.aet
            yield 0xFF00, rsp

    def _instances(self, event: Any, kind: str) -> list[qr_data.Instance]:
        model, level, keys = self._parse(event, kind)
        return qr_data.expected_instances(self.data, keys, level=level, model=model)

    def _sop_classes(self) -> list[str]:
        return sorted({i.sop_class_uid for i in self.data.instances})

    def _on_get(self, event: Any) -> Any:
        try:
            instances = self._instances(event, "get")
        except Exception as exc:
            self.errors.append(f"get: {exc!r}")
            yield 0xA900, None
            return
        yield len(instances)
        for inst in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, dcmread(inst.path)

    def _on_move(self, event: Any) -> Any:
        from pynetdicom.presentation import build_context

        destination = event.move_destination
        try:
            instances = self._instances(event, "move")
        except Exception as exc:
            self.errors.append(f"move: {exc!r}")
            yield None, None
            return
        if destination not in self.destinations:
            yield None, None  # -> 0xA801 Move Destination Unknown
            return
        host, port = self.destinations[destination]
        contexts = [build_context(sop, ExplicitVRLittleEndian) for sop in self._sop_classes()]
        yield host, port, {"contexts": contexts}
        yield len(instances)
        for inst in instances:
            if event.is_cancelled:
                yield 0xFE00, None
                return
            yield 0xFF00, dcmread(inst.path)

    def start(self) -> PynetdicomQRSCP:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, evt

        ae = pynetdicom_ae(self.aet)
        ae.maximum_pdu_size = 0
        ae.add_supported_context(VERIFICATION, ALL_TRANSFER_SYNTAXES)
        for uid in MODEL_OF_SOP_CLASS:
            ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
        for sop in self._sop_classes():
            # C-GET sub-operations: the requestor acts as the storage SCP; only the
            # files' own transfer syntax, so nothing needs to be converted.
            ae.add_supported_context(sop, [ExplicitVRLittleEndian], scu_role=False,
                                     scp_role=True)  # fmt: skip
        handlers = [
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
        ]
        last: Exception | None = None
        for _ in range(3):
            port = free_port()
            try:
                self._server = ae.start_server((HOST, port), block=False, evt_handlers=handlers)
                self.port = port
                return self
            except OSError as exc:
                last = exc
        assert last is not None
        raise last

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
