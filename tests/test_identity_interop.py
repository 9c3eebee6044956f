"""Identity, access control and audit against real peers: DCMTK (`storescu -usr -pwd`,
`echoscu`, `findscu`) and pynetdicom in both roles, and the `dicomnet` commands
(`passwd`, `serve --users --require-user --access --audit`, SCU `--user/--password`)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from peers import (
    HOST,
    VERIFICATION,
    ServerFactory,
    _dcmtk,
    describe_cli,
    dicomnet_command,
    dicomnet_env,
    echoscu,
    pynetdicom_ae,
    run_dicomnet,
    run_tool,
    storescu,
)
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

import dicomnet
from dicomnet.identity import PasswordFile, UserIdentity, read_users, verify_hash
from dicomnet.proto.contexts import STUDY_ROOT_FIND, STUDY_ROOT_MOVE, PresentationContext

pytestmark = pytest.mark.timeout(120)

PASSWORD = "s3cret-Pa55"
WRONG = "guessed-Pa55"
CT_FILE = Path(get_testdata_file("CT_small.dcm"))
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CT_UID = "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def passwd(*args: object, stdin: str) -> subprocess.CompletedProcess[str]:
    """`dicomnet passwd` with the password on standard input (not a terminal)."""
    return subprocess.run(
        [*dicomnet_command(), "passwd", *map(str, args)],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env=dicomnet_env(),
    )


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    done = passwd("alice", "--file", path, stdin=PASSWORD + "\n")
    assert done.returncode == 0, done.stderr
    return path


def test_passwd_from_stdin(tmp_path: Path) -> None:
    path = tmp_path / "users"
    assert passwd("alice", "--file", path, stdin=PASSWORD + "\n").returncode == 0
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert passwd("bob", "--file", path, stdin="bobs password\n").returncode == 0
    first = read_users(path)
    assert passwd("alice", "--file", path, stdin="changed\n").returncode == 0  # update
    after = read_users(path)
    assert list(after) == ["alice", "bob"] and after["bob"] == first["bob"]
    assert verify_hash("changed", after["alice"]) and not verify_hash(PASSWORD, after["alice"])
    assert PASSWORD not in path.read_text() and "changed" not in path.read_text()
    assert passwd("alice", "--file", path, "--check", stdin="changed\n").returncode == 0
    assert passwd("alice", "--file", path, "--check", stdin=PASSWORD + "\n").returncode == 1
    assert passwd("nobody", "--file", path, "--check", stdin="changed\n").returncode == 1
    printed = passwd("carol", stdin="pw\n")
    assert printed.returncode == 0 and printed.stdout.startswith("carol:scrypt:16384:8:1:")
    assert passwd("carol", stdin="\n").returncode == 1  # empty password
    assert passwd("bad:name", stdin="x\n").returncode == 2
    no_flag = run_dicomnet(["passwd", "alice", "--password", "x"])
    assert no_flag.returncode == 2  # never from an option


def _audit(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.dcmtk
def test_dcmtk_user_identity_against_serve(
    dicomnet_server: ServerFactory, users: Path, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    server = dicomnet_server(
        extra_args=["--users", users, "--require-user", "--audit", audit, "--debug"]
    )
    right = storescu(server.port, [CT_FILE], extra_args=["-usr", "alice", "-pwd", PASSWORD, "-rsp"])
    assert right.returncode == 0, right
    wrong = storescu(server.port, [CT_FILE], extra_args=["-usr", "alice", "-pwd", WRONG])
    assert "Association Rejected" in wrong.output, wrong
    none = echoscu(server.port)
    assert none.returncode != 0 and "Association Rejected" in none.output, none
    assert CT_UID in server.wait_stored([CT_UID])
    events = _audit(audit)
    associations = [e for e in events if e["kind"].startswith("association-")]
    assert [e["kind"] for e in associations] == [
        "association-accepted",
        "association-released",
        "association-rejected",
        "association-rejected",
    ]
    accepted, _, bad, missing = associations
    assert accepted["user"] == "alice" and accepted["calling_ae"] == "STORESCU"
    assert (bad["result"], bad["source"], bad["reason"]) == (1, 1, 1)
    assert bad["claimed_user"] == "alice" and "user" not in bad and bad["identity_type"] == 2
    assert missing["calling_ae"] == "ECHOSCU" and "identity_type" not in missing
    stores = [e for e in events if e["kind"] == "operation"]
    assert [(e["service"], e["sop_instance_uid"], e["user"]) for e in stores] == [
        ("store", CT_UID, "alice")
    ]
    alerts = [e["detail"] for e in events if e["kind"] == "security-alert"]
    assert len(alerts) == 2 and "not verified" in alerts[0] and "no user" in alerts[1]
    server.stop()
    for text in (audit.read_text(), server.log_text(None)):
        assert PASSWORD not in text and WRONG not in text


@pytest.mark.dcmtk
def test_dcmtk_store_allowed_query_refused(dicomnet_server: ServerFactory, tmp_path: Path) -> None:
    access = tmp_path / "access.toml"
    access.write_text(
        '[[rule]]\ncalling = "MODALITY"\naddress = "127.0.0.0/8"\n'
        'services = ["echo", "store"]\n'
        '[[rule]]\ncalling = "VIEWER"\nservices = ["echo", "find"]\n'
    )
    audit = tmp_path / "audit.jsonl"
    server = dicomnet_server(extra_args=["--access", access, "--audit", audit])
    stored = storescu(server.port, [CT_FILE], aet="MODALITY")
    assert stored.returncode == 0, stored
    find = [_dcmtk("findscu"), "-v", "-S", "-to", "10", "-ta", "10", "-aec", "ANY-SCP",
            "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName="]  # fmt: skip
    refused = run_tool([*find, "-aet", "MODALITY", HOST, str(server.port)])
    # Its one context refused, nothing is left: the association is rejected.
    assert refused.returncode != 0 and "Association Rejected" in refused.output, refused
    # pynetdicom proposes both: store accepted, find rejected (result 1, user-rejection).
    scu = pynetdicom_ae("MODALITY")
    scu.add_requested_context(CT_STORAGE)
    scu.add_requested_context(STUDY_ROOT_FIND)
    assoc = scu.associate(HOST, server.port, ae_title="DICOMNET")
    try:
        assert assoc.is_established
        assert [(c.abstract_syntax, c.result) for c in assoc.rejected_contexts] == [
            (STUDY_ROOT_FIND, 1)
        ]
        with pytest.raises(ValueError, match="presentation context"):
            next(assoc.send_c_find(Dataset(), STUDY_ROOT_FIND))
        status = assoc.send_c_store(dcmread(CT_FILE))
        assert status.Status == 0
    finally:
        assoc.release()
    allowed = run_tool([*find, "-aet", "VIEWER", HOST, str(server.port)])
    assert allowed.returncode == 0 and "CompressedSamples^CT1" in allowed.output, allowed
    events = _audit(audit)
    alerts = [e for e in events if e["kind"] == "security-alert"]
    assert alerts and alerts[0]["calling_ae"] == "MODALITY" and alerts[0]["service"] == "find"
    assert alerts[0]["alert"] == "Use of Restricted Function"
    queries = [e for e in events if e.get("service") == "find"]
    assert [q["calling_ae"] for q in queries if q["kind"] == "operation"] == ["VIEWER"]


def test_cli_identity_flags_against_serve(dicomnet_server: ServerFactory, users: Path) -> None:
    server = dicomnet_server(extra_args=["--users", users, "--require-user"])
    base = ["echo", HOST, server.port, "--aec", "DICOMNET"]
    ok = run_dicomnet([*base, "--user", "alice", "--password", PASSWORD, "--positive-response"])
    assert ok.returncode == 0, describe_cli(ok)
    bad = run_dicomnet([*base, "--user", "alice", "--password", WRONG])
    assert bad.returncode != 0 and "reject" in bad.stderr.lower(), describe_cli(bad)
    assert run_dicomnet(base).returncode != 0
    assert run_dicomnet([*base, "--password", PASSWORD]).returncode != 0  # needs --user
    stored = run_dicomnet(["store", HOST, server.port, CT_FILE, "--user", "alice", "--password",
                           PASSWORD])  # fmt: skip
    assert stored.returncode == 0, describe_cli(stored)
    bench = run_dicomnet(["bench", HOST, server.port, "--op", "echo", "--count", "3", "--user",
                          "alice", "--password", PASSWORD])  # fmt: skip
    assert bench.returncode == 0, describe_cli(bench)
    server.stop()
    assert PASSWORD not in server.log_text(None) and WRONG not in server.log_text(None)


def test_serve_refuses_a_move_to_an_unknown_destination(
    dicomnet_server: ServerFactory, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    server = dicomnet_server(extra_args=["--peer", "KNOWN=127.0.0.1:1", "--audit", audit])
    assert run_dicomnet(["store", HOST, server.port, CT_FILE]).returncode == 0

    async def move(destination: str) -> int:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
        async with dicomnet.connect(
            HOST, server.port, contexts=[PresentationContext(STUDY_ROOT_MOVE)]
        ) as assoc:
            try:
                async for _ in assoc.move(query, destination=destination):
                    pass
            except dicomnet.DimseError as exc:
                return int(exc.status)
        return 0

    # Only destinations of the peer table (--peer): anything else is 0xA801 (PS3.4 C.4.2.1.4).
    assert anyio.run(move, "ATTACKER") == 0xA801
    assert anyio.run(move, "KNOWN") != 0xA801  # known, yet unreachable: another failure
    moves = [e for e in _audit(audit) if e.get("command") == "C-MOVE"]
    assert len(moves) == 2
    first = moves[0]
    assert (first["move_destination"], first["status"], first["outcome"]) == ("ATTACKER", 0xA801, 8)
    assert moves[1]["move_destination"] == "KNOWN" and moves[1]["failed"] == 1
    assert moves[0]["query"]["StudyInstanceUID"].endswith(".12322")
    assert moves[0]["event_id"] == "DICOM Instances Transferred" and moves[0]["action"] == "R"


# --------------------------------------------------------------------------
# pynetdicom both ways


def _pynetdicom_identity(kind: int, primary: bytes, secondary: bytes = b"") -> Any:
    from pynetdicom.pdu_primitives import UserIdentityNegotiation

    item = UserIdentityNegotiation()
    item.user_identity_type = kind
    item.positive_response_requested = True
    item.primary_field = primary
    if secondary:
        item.secondary_field = secondary
    return item


def test_pynetdicom_scu_sends_a_password(users: Path) -> None:
    seen: list[str | None] = []
    ae = dicomnet.AE("PACS", authenticator=PasswordFile(users), require_user_identity=True)

    @ae.on_echo
    async def echo(request: dicomnet.EchoRequest) -> int:
        seen.append(request.association.user)  # type: ignore[attr-defined]
        return 0

    def pynetdicom_side(port: int) -> list[tuple[bool, bool, Any]]:
        outcomes = []
        for password in (PASSWORD.encode(), WRONG.encode()):
            scu = pynetdicom_ae()
            scu.add_requested_context(VERIFICATION)
            identity = _pynetdicom_identity(2, b"alice", password)
            assoc = scu.associate(HOST, port, ae_title="PACS", ext_neg=[identity])
            response = None
            established = assoc.is_established
            if established:
                response = assoc.acceptor.user_identity
                assoc.send_c_echo()
                assoc.release()
            outcomes.append((established, assoc.is_rejected, response))
        return outcomes

    async def main() -> list[tuple[bool, bool, Any]]:
        with anyio.fail_after(60):
            async with ae.serve(HOST, 0) as server:
                return await anyio.to_thread.run_sync(pynetdicom_side, server.port)

    (ok, ok_rejected, response), (bad, bad_rejected, _) = anyio.run(main)
    assert ok and not ok_rejected, (ok, ok_rejected, response)
    assert seen == ["alice"]
    assert response is not None and response.server_response == b""  # asked: confirmed
    assert not bad and bad_rejected


@pytest.fixture
def pynetdicom_scp() -> Iterator[tuple[int, list[tuple[int, bytes, bytes]]]]:
    """A pynetdicom Verification SCP checking identities in its EVT_USER_ID handler."""
    from pynetdicom import evt

    seen: list[tuple[int, bytes, bytes]] = []
    lock = threading.Lock()

    def check(event: Any) -> tuple[bool, bytes | None]:
        with lock:
            seen.append((event.user_id_type, event.primary_field, event.secondary_field or b""))
        if event.user_id_type == 2:
            return event.primary_field == b"alice" and event.secondary_field == b"pw", None
        if event.user_id_type == 5:
            return event.primary_field == b"token", b"signed-response"
        return False, None

    scp = pynetdicom_ae("PYSCP")
    scp.add_supported_context(VERIFICATION)
    server = scp.start_server((HOST, 0), block=False, evt_handlers=[(evt.EVT_USER_ID, check)])
    try:
        yield server.server_address[1], seen
    finally:
        server.shutdown()


def test_our_scu_sends_identities_to_pynetdicom(
    pynetdicom_scp: tuple[int, list[tuple[int, bytes, bytes]]],
) -> None:
    port, seen = pynetdicom_scp

    async def echo(identity: UserIdentity) -> tuple[int, bytes | None]:
        async with dicomnet.connect(
            HOST, port, aec="PYSCP", contexts=[PresentationContext(VERIFICATION)],
            user_identity=identity,
        ) as assoc:  # fmt: skip
            return int(await assoc.echo()), assoc.user_identity_response

    good = UserIdentity.password("alice", "pw", positive_response=True)
    # pynetdicom answers a positive response for types 3 to 5 only.
    assert anyio.run(echo, good) == (0, None)
    with pytest.raises(dicomnet.AssociationRejected):
        anyio.run(echo, UserIdentity.password("alice", "wrong"))
    token = UserIdentity.jwt("token", positive_response=True)
    assert anyio.run(echo, token) == (0, b"signed-response")
    assert seen == [(2, b"alice", b"pw"), (2, b"alice", b"wrong"), (5, b"token", b"")]


def test_serve_security_options_errors(tmp_path: Path) -> None:
    storage = tmp_path / "storage"
    base = ["serve", "--port", "0", "--storage", storage]
    usage = run_dicomnet([*base, "--require-user"], timeout=60)
    assert usage.returncode == 2 and "--require-user needs --users" in usage.stderr
    access = tmp_path / "access.toml"
    access.write_text('[[rule]]\nservices = ["teleport"]\n')
    bad = run_dicomnet([*base, "--access", access], timeout=60)
    assert bad.returncode == 1 and "unknown service" in bad.stderr, describe_cli(bad)
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = run_dicomnet([*base, "--users", tmp_path / "nope"], timeout=60)
    assert missing.returncode == 1 and "nope" in missing.stderr, describe_cli(missing)
