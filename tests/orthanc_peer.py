"""Orthanc (Debian package ``orthanc``, 1.10.x) as a real PACS peer for the tests.

``start_orthanc`` writes a self-contained JSON configuration into a work folder (storage and
index there, free DICOM and HTTP ports on 127.0.0.1, no authentication, no plugins, log file
there), runs ``Orthanc <config>`` as a subprocess and waits until ``GET /system`` answers.
``OrthancPeer`` wraps the REST API with urllib (stdlib only).

Storage commitment (PS3.4 Annex J, Push Model) as Orthanc 1.10 does it:

- Orthanc as SCU (``request_commitment``): ``POST /modalities/{id}/storage-commitment`` opens a
  new association (default roles), sends N-ACTION, reads N-ACTION-RSP (which must carry the
  Affected SOP Class/Instance UIDs and no data set) and releases. The report must come back on
  another association, opened by the remote to Orthanc's DICOM port with a calling AET that
  is listed in ``DicomModalities``; Orthanc then stores it under its Transaction UID.
- Orthanc as SCP: an N-ACTION from a calling AET listed in ``DicomModalities`` (unknown AETs
  get the association aborted) is answered with status 0x0000 at once, then a
  ``StorageCommitmentScp`` job opens a NEW association to that modality's host/port (matched
  by AET, case-insensitively), proposing SCP/SCU role selection with SCP role only, and sends
  N-EVENT-REPORT: event type 1 (all committed) or 2 with a Failed SOP Sequence whose Failure
  Reason is 0x0112 (instance not in Orthanc) or 0x0119 (stored with another SOP Class UID).
  The calling AET of that association is the Called AET the requester used for N-ACTION, and
  the report can arrive before the requester has even read the N-ACTION-RSP.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import math
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ORTHANC_BINARY = "/usr/sbin/Orthanc"
STARTUP_TIMEOUT = 30.0

_running: list[OrthancPeer] = []


class OrthancError(RuntimeError):
    """A REST call that Orthanc answered with an HTTP error (``status``, parsed ``body``)."""

    def __init__(self, method: str, path: str, status: int, body: Any) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body}")
        self.status = status
        self.body = body


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable (``$ORTHANC_BINARY``, /usr/sbin/Orthanc, or PATH)."""
    for candidate in (os.environ.get("ORTHANC_BINARY"), ORTHANC_BINARY):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("Orthanc")


@functools.cache
def orthanc_missing() -> str | None:
    """Why Orthanc cannot run here, or None if it can (checked once)."""
    binary = orthanc_binary()
    if binary is None:
        return "Orthanc not found (apt-get install orthanc; or set ORTHANC_BINARY)"
    try:
        out = subprocess.run([binary, "--version"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{binary} --version failed: {exc}"
    if out.returncode != 0:
        return f"{binary} --version exited {out.returncode}: {out.stderr.decode(errors='replace')}"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def orthanc_config(
    workdir: Path,
    *,
    aet: str,
    dicom_port: int,
    http_port: int,
    modalities: Mapping[str, tuple[str, str, int]],
) -> dict[str, Any]:
    """The configuration ``start_orthanc`` writes (before ``extra_config`` is merged in)."""
    return {
        "Name": f"dicomnet-test-{aet}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "storage"),
        "Plugins": [],  # the Debian /etc/orthanc config loads /usr/share/orthanc/plugins
        "LuaScripts": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,  # HTTP on loopback only (1.10 has no bind address)
        "AuthenticationEnabled": False,
        "RegisteredUsers": {},
        "OrthancExplorerEnabled": False,
        "WebDavEnabled": False,
        "HttpDescribeErrors": True,
        "HttpCompressionEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": aet,
        "DicomPort": dicom_port,  # note: Orthanc listens on all interfaces
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomCheckModalityHost": False,
        "DicomScuTimeout": 10,
        "DicomScpTimeout": 30,
        "DicomAssociationCloseDelay": 0,  # don't keep C-STORE SCU associations open 5 s
        "DicomModalities": {
            name: [ae, host, port] for name, (ae, host, port) in modalities.items()
        },
        "DicomModalitiesInDatabase": False,
        "StorageCommitmentReportsSize": 100,  # reports kept in memory (default 100)
        "SaveJobs": False,  # don't replay jobs of an earlier run
        "JobsHistorySize": 100,
        "ConcurrentJobs": 2,
        "MetricsEnabled": False,
        "StableAge": 60,
        "OverwriteInstances": True,
    }


@dataclass
class OrthancPeer:
    """A running Orthanc started by ``start_orthanc``; ``stop()`` it (or use ``with``)."""

    workdir: Path
    aet: str
    dicom_port: int
    http_port: int
    log_path: Path
    proc: subprocess.Popen[bytes]
    returncode: int | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    # --- lifecycle -------------------------------------------------------------------------

    def stop(self, timeout: float = 15.0, *, kill: bool = False) -> int:
        """SIGTERM (a clean stop takes ~3.5 s), wait, SIGKILL if needed; the exit code.

        ``kill=True`` sends SIGKILL at once (fine for a throw-away workdir). Idempotent."""
        if self.returncode is None:
            if self.proc.poll() is None:
                if kill:
                    self.proc.kill()
                else:
                    self.proc.terminate()
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout)
            self.returncode = int(self.proc.returncode)
        if self in _running:
            _running.remove(self)
        return self.returncode

    def __enter__(self) -> OrthancPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_text(self) -> str:
        """Orthanc's log file plus whatever it printed on stdout/stderr."""
        parts = []
        for path in (self.log_path, self.workdir / "orthanc.stdout"):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace"))
        return "\n".join(parts)

    # --- REST ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> Any:
        """One REST call; the parsed JSON answer (None when empty). Raises OrthancError."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        if body is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raw = exc.read()
            try:
                detail: Any = json.loads(raw)
            except ValueError:
                detail = raw.decode(errors="replace")
            raise OrthancError(method, path, exc.code, detail) from None
        return json.loads(raw) if raw.strip() else None

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        """POST ``body`` as JSON (bytes are sent as they are)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, data)

    def delete(self, path: str) -> Any:
        return self.request("DELETE", path)

    def upload(self, dicom: bytes) -> str:
        """Store a Part-10 file through ``POST /instances``; Orthanc's instance id."""
        answer = self.request("POST", "/instances", dicom, "application/dicom")
        return str(answer["ID"])

    def instances(self) -> list[str]:
        """Orthanc ids of all stored instances."""
        return list(self.get("/instances"))

    def sop_instance_uids(self) -> set[str]:
        """SOP Instance UIDs of all stored instances."""
        found = self.get("/instances?expand")
        return {str(i["MainDicomTags"]["SOPInstanceUID"]) for i in found}

    def jobs(self, job_type: str | None = None) -> list[dict[str, Any]]:
        """Jobs (expanded), optionally of one ``Type`` such as ``StorageCommitmentScp``."""
        found: list[dict[str, Any]] = self.get("/jobs?expand")
        return [j for j in found if job_type is None or j.get("Type") == job_type]

    def wait_jobs(
        self, job_type: str, count: int = 1, timeout: float = 15.0
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` jobs of ``job_type`` have ended (Success or Failure)."""
        deadline = time.monotonic() + timeout
        while True:
            jobs = self.jobs(job_type)
            done = [j for j in jobs if j.get("State") in ("Success", "Failure")]
            if len(done) >= count:
                return done
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(done)}/{count} {job_type} jobs ended: {jobs}")
            time.sleep(0.05)

    # --- storage commitment, Orthanc as SCU --------------------------------------------------

    def start_commitment(
        self,
        modality: str,
        instances: Sequence[tuple[str, str]],
        dimse_timeout: float | None = None,
    ) -> str:
        """Send N-ACTION to ``modality`` (a DicomModalities name); the Transaction UID.

        Returns once the remote's N-ACTION-RSP was read (HTTP error if it failed)."""
        body: dict[str, Any] = {"DicomInstances": [[c, i] for c, i in instances]}
        if dimse_timeout is not None:
            body["Timeout"] = max(1, math.ceil(dimse_timeout))  # 1.10 wants an integer
        return str(self.post(f"/modalities/{modality}/storage-commitment", body)["ID"])

    def commitment_report(self, transaction_uid: str) -> dict[str, Any]:
        """``GET /storage-commitment/{uid}``: Status Pending/Success/Failure, RemoteAET,
        and once not pending Success [{SOPClassUID, SOPInstanceUID}] and Failures
        [{SOPClassUID, SOPInstanceUID, FailureReason (int), Description}]."""
        report: dict[str, Any] = self.get(f"/storage-commitment/{transaction_uid}")
        return report

    def request_commitment(
        self,
        modality: str,
        instances: Sequence[tuple[str, str]],
        timeout: float = 15.0,
    ) -> dict[str, Any]:
        """N-ACTION to ``modality`` then poll the report until it is not Pending.

        The final report JSON (see ``commitment_report``) plus ``"ID"`` = Transaction UID.
        Raises TimeoutError if no N-EVENT-REPORT arrived within ``timeout``."""
        uid = self.start_commitment(modality, instances, dimse_timeout=timeout)
        deadline = time.monotonic() + timeout
        while True:
            report = self.commitment_report(uid)
            if report.get("Status") != "Pending":
                return {**report, "ID": uid}
            if time.monotonic() > deadline:
                raise TimeoutError(f"storage commitment {uid} still pending: {report}")
            time.sleep(0.05)


def start_orthanc(
    workdir: Path,
    *,
    aet: str = "ORTHANC",
    modalities: Mapping[str, tuple[str, str, int]] | None = None,
    extra_config: Mapping[str, Any] | None = None,
    verbose: bool = True,
    trace_dicom: bool = False,
) -> OrthancPeer:
    """Start Orthanc with a generated config in ``workdir``; returns once REST answers.

    ``modalities``: DicomModalities, name -> (AET, host, port). ``extra_config`` overrides keys
    of ``orthanc_config``. Retries with new ports if one was taken in the meantime."""
    binary = orthanc_binary()
    if binary is None:
        raise RuntimeError(orthanc_missing() or "Orthanc not found")
    workdir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    for _attempt in range(3):
        dicom_port, http_port = _free_port(), _free_port()
        if dicom_port == http_port:
            continue
        config = orthanc_config(
            workdir,
            aet=aet,
            dicom_port=dicom_port,
            http_port=http_port,
            modalities=modalities or {},
        )
        config.update(extra_config or {})
        config_path = workdir / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        log_path = workdir / "orthanc.log"
        argv = [binary, f"--logfile={log_path}"]
        argv += ["--verbose"] if verbose else []
        argv += ["--trace-dicom"] if trace_dicom else []
        argv.append(str(config_path))
        with open(workdir / "orthanc.stdout", "wb") as out:
            proc = subprocess.Popen(
                argv, cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
            )
        dicom_port, http_port = int(config["DicomPort"]), int(config["HttpPort"])
        peer = OrthancPeer(workdir, aet, dicom_port, http_port, log_path, proc)
        _running.append(peer)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                system = peer.request("GET", "/system", timeout=2.0)
                if system.get("DicomPort") == dicom_port:  # ours, not a stranger on the port
                    return peer
            except (OSError, OrthancError, ValueError):
                pass
            time.sleep(0.05)
        code = peer.stop()
        last_error = f"Orthanc exited {code} or did not answer:\n{peer.log_text()[-3000:]}"
    raise RuntimeError(last_error)


@contextlib.contextmanager
def orthanc(workdir: Path, **kwargs: Any) -> Iterator[OrthancPeer]:
    """``with orthanc(tmp_path, modalities=...) as peer:``; always stops it."""
    peer = start_orthanc(workdir, **kwargs)
    try:
        yield peer
    finally:
        peer.stop()


def stop_all(*, kill: bool = False) -> None:
    """Stop every Orthanc this module started that is still running (also run at exit)."""
    for peer in list(_running):
        peer.stop(kill=kill)


atexit.register(stop_all)
