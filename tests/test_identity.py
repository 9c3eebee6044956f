"""User identity (PS3.7 §D.3.3.7): the SCU's `UserIdentity`, the password file, and the
acceptor's verdicts (1/1/1 rejections, positive responses, `Association.user`)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path
from typing import Any

import anyio
import pytest

import dicomnet
from dicomnet import identity as identity_mod
from dicomnet.audit import AuditEvent
from dicomnet.identity import (
    Authenticated,
    PasswordFile,
    UserIdentity,
    hash_password,
    read_users,
    verify_hash,
    write_user,
)
from dicomnet.proto.contexts import VERIFICATION, PresentationContext
from dicomnet.proto.pdu import UserIdentityRQ

pytestmark = pytest.mark.timeout(60)

PASSWORD = "correct horse battery staple"
TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJib2IifQ.c2lnbmF0dXJl"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def users(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    write_user(path, "alice", hash_password(PASSWORD))
    write_user(path, "carol", hash_password("another one"))
    return path


def test_user_identity_builds_the_sub_item_and_hides_secrets() -> None:
    identity = UserIdentity.password("alice", PASSWORD, positive_response=True)
    assert identity.to_pdu() == UserIdentityRQ(2, True, b"alice", PASSWORD.encode())
    jwt = UserIdentity.jwt(TOKEN)
    assert jwt.to_pdu() == UserIdentityRQ(5, False, TOKEN.encode())
    assert UserIdentity.username("bob").to_pdu() == UserIdentityRQ(1, False, b"bob")
    assert UserIdentity.saml("<a/>").to_pdu().identity_type == 4
    assert UserIdentity.kerberos(b"\x01\x02").to_pdu().identity_type == 3
    for shown in (repr(identity), str(identity), repr(identity.to_pdu())):
        assert "alice" in shown and PASSWORD not in shown
    for shown in (repr(jwt), str(jwt), repr(jwt.to_pdu())):
        assert TOKEN not in shown


def test_hash_is_salted_self_describing_and_verified() -> None:
    first, second = hash_password(PASSWORD), hash_password(PASSWORD)
    assert first != second  # salted
    algorithm, n, r, p, _salt, _digest = first.split(":")
    assert (algorithm, n, r, p) == ("scrypt", "16384", "8", "1")
    assert verify_hash(PASSWORD, first) and not verify_hash("wrong", first)
    cheap = hash_password(PASSWORD, n=1024, r=4, p=1)
    assert cheap.startswith("scrypt:1024:4:1:") and verify_hash(PASSWORD, cheap)


def test_users_file_is_private_and_updated_in_place(tmp_path: Path) -> None:
    path = tmp_path / "users"
    write_user(path, "alice", hash_password("one"))
    write_user(path, "bob", hash_password("two"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    before = read_users(path)
    write_user(path, "alice", hash_password("three"))
    after = read_users(path)
    assert list(after) == ["alice", "bob"]  # same order, one line each
    assert after["bob"] == before["bob"] and after["alice"] != before["alice"]
    assert verify_hash("three", after["alice"]) and not verify_hash("one", after["alice"])
    with pytest.raises(ValueError):
        write_user(path, "bad:name", hash_password("x"))
    path.write_text("alice:md5:abc\n")
    with pytest.raises(ValueError, match="users:1"):
        PasswordFile(path)


@pytest.mark.anyio
async def test_password_file_verifies_and_an_unknown_user_costs_the_same(
    users: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    file = PasswordFile(users)
    calls: list[int] = []
    real = identity_mod._scrypt

    def counting(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
        calls.append(n)
        return real(password, salt, n, r, p)

    monkeypatch.setattr(identity_mod, "_scrypt", counting)
    ok = await file(UserIdentityRQ(2, False, b"alice", PASSWORD.encode()))
    assert ok == Authenticated("alice")
    assert await file(UserIdentityRQ(2, False, b"alice", b"wrong")) is None
    assert await file(UserIdentityRQ(2, False, b"mallory", PASSWORD.encode())) is None
    # One scrypt of the same cost for a known user, a wrong password and an unknown user.
    assert calls == [16384, 16384, 16384]
    assert await file(UserIdentityRQ(1, False, b"alice")) is None  # not a password
    assert await file(UserIdentityRQ(5, False, TOKEN.encode())) is None
    assert len(calls) == 3


async def _echo(port: int, identity: Any = None, **kwargs: Any) -> tuple[Any, bytes | None]:
    async with dicomnet.connect(
        "127.0.0.1",
        port,
        aec="PACS",
        contexts=[PresentationContext(VERIFICATION)],
        user_identity=identity,
        **kwargs,
    ) as assoc:
        status = await assoc.echo()
        return status, assoc.user_identity_response


def _serving_ae(users: Path | None, required: bool, events: list[AuditEvent]) -> dicomnet.AE:
    ae = dicomnet.AE(
        "PACS",
        authenticator=PasswordFile(users) if users else None,
        require_user_identity=required,
        audit=events.append,
    )
    seen: list[str | None] = []
    ae.seen_users = seen  # type: ignore[attr-defined]

    @ae.on_echo
    async def echo(request: dicomnet.EchoRequest) -> int:
        seen.append(request.association.user)  # type: ignore[attr-defined]
        return 0

    return ae


@pytest.mark.anyio
async def test_required_identity_accepts_the_right_password_only(
    users: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dicomnet")
    events: list[AuditEvent] = []
    ae = _serving_ae(users, True, events)
    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            right = UserIdentity.password("alice", PASSWORD, positive_response=True)
            status, response = await _echo(server.port, right)
            assert status == 0 and response == b""  # PS3.7 D.3.3.7.2: empty for type 2
            assert ae.seen_users == ["alice"]  # type: ignore[attr-defined]
            for wrong in (
                UserIdentity.password("alice", "not it"),
                UserIdentity.password("mallory", PASSWORD),
                UserIdentity.username("alice"),
                UserIdentity.jwt(TOKEN),
                None,
            ):
                with pytest.raises(dicomnet.AssociationRejected) as rejected:
                    await _echo(server.port, wrong)
                exc = rejected.value
                assert (exc.result, exc.source, exc.reason) == (1, 1, 1), wrong
    kinds = [e.kind for e in events]
    assert kinds.count("association-accepted") == 1
    assert kinds.count("association-rejected") == 5
    assert kinds.count("security-alert") == 5
    accepted = next(e for e in events if e.kind == "association-accepted")
    assert accepted.user == "alice" and accepted.calling_ae == "DICOMNET"
    lines = "\n".join(json.dumps(e.to_json()) for e in events)
    assert '"claimed_user": "mallory"' in lines
    for secret in (PASSWORD, "not it", TOKEN):
        assert secret not in lines
        assert secret not in caplog.text


@pytest.mark.anyio
async def test_optional_identity(users: Path) -> None:
    events: list[AuditEvent] = []
    ae = _serving_ae(users, False, events)
    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            assert await _echo(server.port) == (0, None)
            # A user name alone is accepted, not verified: no positive response.
            asked = UserIdentity.username("bob", positive_response=True)
            assert await _echo(server.port, asked) == (0, None)
            # A wrong password is refused even when an identity is not required.
            with pytest.raises(dicomnet.AssociationRejected):
                await _echo(server.port, UserIdentity.password("alice", "nope"))
            ok = UserIdentity.password("alice", PASSWORD)
            assert await _echo(server.port, ok) == (0, None)  # no positive response asked
            # A raw sub-item is still accepted by connect().
            raw = UserIdentityRQ(2, True, b"alice", PASSWORD.encode())
            assert await _echo(server.port, raw) == (0, b"")
    assert ae.seen_users == [None, None, "alice", "alice"]  # type: ignore[attr-defined]


@pytest.mark.anyio
async def test_an_application_authenticator_judges_tokens() -> None:
    async def tokens(identity: UserIdentityRQ) -> Authenticated | None:
        if identity.identity_type == 5 and identity.primary_field == TOKEN.encode():
            return Authenticated("bob", b"jwt-response")
        return None

    ae = dicomnet.AE("PACS", authenticator=tokens, require_user_identity=True)
    requests: list[dicomnet.AssociationRequest] = []

    @ae.on_association
    async def admit(request: dicomnet.AssociationRequest) -> None:
        requests.append(request)

    with anyio.fail_after(30):
        async with ae.serve("127.0.0.1", 0) as server:
            good = UserIdentity.jwt(TOKEN, positive_response=True)
            assert await _echo(server.port, good) == (0, b"jwt-response")
            with pytest.raises(dicomnet.AssociationRejected):
                await _echo(server.port, UserIdentity.jwt("forged"))
    assert len(requests) == 1  # the rejected one never reached on_association
    assert requests[0].user == "bob" and requests[0].peer_certificate is None
    assert requests[0].user_identity is not None


@pytest.mark.anyio
async def test_password_checks_never_block_the_event_loop(users: Path) -> None:
    file = PasswordFile(users)
    ticks = 0
    done = anyio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await anyio.sleep(0.002)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(ticker)
            async with anyio.create_task_group() as checks:
                for name in ("alice", "mallory") * 4:
                    checks.start_soon(file.verify, name, b"wrong")
            done.set()
    # Eight scrypt computations (some 50 ms each, four at a time) ran in threads: the
    # loop kept ticking meanwhile. On the loop they would leave it one tick per check.
    assert ticks > 20
