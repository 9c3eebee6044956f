"""User identity (PS3.7 §D.3.3.7): what an SCU presents, and how an acceptor checks it.

`UserIdentity` builds the User Identity sub-item a requestor sends. An acceptor judges
it with an `Authenticator`: any async callable taking the `UserIdentityRQ` and
returning an `Authenticated` (the verified user name, and the server response to send
when a positive response was asked for) or None (not verified). `PasswordFile` is one:
username and passcode (type 2) checked against salted scrypt hashes, one line per user,
as `dicomnet passwd` writes them:

    NAME:scrypt:N:R:P:SALT:HASH        (SALT and HASH in base64)

Secrets never appear in a `repr`, a `str` or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread

from dicomnet.proto.pdu import UserIdentityRQ

__all__ = [
    "Authenticated",
    "Authenticator",
    "PasswordFile",
    "UserIdentity",
    "hash_password",
    "verify_hash",
]

USERNAME = 1
USERNAME_AND_PASSCODE = 2
KERBEROS = 3
SAML = 4
JWT = 5
IDENTITY_TYPES = {
    USERNAME: "username",
    USERNAME_AND_PASSCODE: "username-password",
    KERBEROS: "kerberos",
    SAML: "saml",
    JWT: "jwt",
}

# scrypt cost: 2**14 x 8 x 1 takes 16 MiB and some 50 ms (RFC 7914 §2's interactive
# use); a hash line names its own parameters, so they can be raised later.
SCRYPT_N = 1 << 14
SCRYPT_R = 8
SCRYPT_P = 1
_SCRYPT_MAXMEM = 256 << 20
_SALT_BYTES = 16
_HASH_BYTES = 32
# At most this many scrypt computations at once (each takes 128*N*r bytes of memory);
# the others wait in the event loop, not in worker threads.
HASHING_LIMIT = 4


@dataclass(frozen=True, slots=True)
class UserIdentity:
    """A user identity to negotiate (PS3.7 §D.3.3.7.1); make one with the class methods.

    `positive_response`: ask the acceptor to confirm it (the answer is then on
    `Association.user_identity_response`). Secrets stay out of `repr`.
    """

    identity_type: int
    primary: bytes = field(repr=False)
    secondary: bytes = field(default=b"", repr=False)
    positive_response: bool = False

    @classmethod
    def username(cls, name: str, *, positive_response: bool = False) -> UserIdentity:
        return cls(USERNAME, name.encode(), b"", positive_response)

    @classmethod
    def password(cls, name: str, password: str, *, positive_response: bool = False) -> UserIdentity:
        return cls(USERNAME_AND_PASSCODE, name.encode(), password.encode(), positive_response)

    @classmethod
    def kerberos(cls, ticket: bytes, *, positive_response: bool = False) -> UserIdentity:
        return cls(KERBEROS, bytes(ticket), b"", positive_response)

    @classmethod
    def saml(cls, assertion: str | bytes, *, positive_response: bool = False) -> UserIdentity:
        return cls(SAML, _as_bytes(assertion), b"", positive_response)

    @classmethod
    def jwt(cls, token: str | bytes, *, positive_response: bool = False) -> UserIdentity:
        return cls(JWT, _as_bytes(token), b"", positive_response)

    @property
    def user_name(self) -> str | None:
        """The user name of types 1 and 2 (not a secret); None for tokens."""
        if self.identity_type in (USERNAME, USERNAME_AND_PASSCODE):
            return self.primary.decode("utf-8", "replace")
        return None

    def to_pdu(self) -> UserIdentityRQ:
        """The User Identity sub-item of the A-ASSOCIATE-RQ."""
        return UserIdentityRQ(
            self.identity_type, self.positive_response, self.primary, self.secondary
        )

    def __repr__(self) -> str:
        kind = IDENTITY_TYPES.get(self.identity_type, str(self.identity_type))
        name = f" {self.user_name!r}" if self.user_name is not None else ""
        return f"<UserIdentity {kind}{name}>"

    __str__ = __repr__


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


def claimed_user(identity: UserIdentityRQ | None) -> str | None:
    """The user name an identity claims (types 1 and 2), not yet verified."""
    if identity is None or identity.identity_type not in (USERNAME, USERNAME_AND_PASSCODE):
        return None
    return identity.primary_field.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A verified identity: the user name, and the User Identity server response sent
    when the requestor asked for one (PS3.7 §D.3.3.7.2: empty for types 1 and 2; the
    Kerberos server ticket, SAML response or JWT response for types 3 to 5)."""

    user: str
    server_response: bytes = field(default=b"", repr=False)


Authenticator = Callable[[UserIdentityRQ], Awaitable[Authenticated | None]]


def _scrypt(password: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password, salt=salt, n=n, r=r, p=p, maxmem=_SCRYPT_MAXMEM, dklen=_HASH_BYTES
    )


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    """A salted scrypt hash of `password`, self-describing: `scrypt:N:R:P:SALT:HASH`."""
    salt = secrets.token_bytes(_SALT_BYTES)
    digest = _scrypt(password.encode(), salt, n, r, p)
    return f"scrypt:{n}:{r}:{p}:{_b64(salt)}:{_b64(digest)}"


@dataclass(frozen=True, slots=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    digest: bytes = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> _Hash:
        algorithm, n, r, p, salt, digest = text.split(":")
        if algorithm != "scrypt":
            raise ValueError(f"unknown password hash algorithm {algorithm!r}")
        hashed = cls(int(n), int(r), int(p), base64.b64decode(salt), base64.b64decode(digest))
        if hashed.n < 2 or hashed.n & (hashed.n - 1) or hashed.r < 1 or hashed.p < 1:
            raise ValueError("bad scrypt parameters")
        return hashed

    def matches(self, password: bytes) -> bool:
        candidate = _scrypt(password, self.salt, self.n, self.r, self.p)
        return hmac.compare_digest(candidate, self.digest)


def verify_hash(password: str, hashed: str) -> bool:
    """Whether `password` matches a `hash_password` result (blocking: scrypt runs here)."""
    return _Hash.parse(hashed).matches(password.encode())


def check_user_name(name: str) -> str:
    """A user name fit for the users file: 1 to 1024 characters, none of ':' or controls."""
    if not name or len(name) > 1024 or ":" in name or any(ord(c) < 32 for c in name):
        raise ValueError("a user name has 1 to 1024 characters, no ':' and no control character")
    return name


def read_users(path: Path) -> dict[str, str]:
    """The users file: name -> hash text (blank lines and `#` comments skipped)."""
    users: dict[str, str] = {}
    for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, hashed = line.partition(":")
        try:
            if not sep:
                raise ValueError("no ':'")
            _Hash.parse(hashed)
        except ValueError as exc:
            raise ValueError(f"{path}:{number}: not NAME:scrypt:N:R:P:SALT:HASH ({exc})") from None
        users[name] = hashed
    return users


def write_user(path: Path, name: str, hashed: str) -> None:
    """Add or replace `name`'s line in the users file (created 0600), atomically."""
    check_user_name(name)
    lines: list[str] = []
    if path.exists():
        lines = path.read_text("utf-8").splitlines()
    entry = f"{name}:{hashed}"
    for i, line in enumerate(lines):
        if line.partition(":")[0] == name and not line.lstrip().startswith("#"):
            lines[i] = entry
            break
    else:
        lines.append(entry)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write("\n".join(lines) + "\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class PasswordFile:
    """An `Authenticator` for username and passcode (type 2) over a users file.

    Checked with scrypt in a worker thread (the event loop never waits for it) and
    `hmac.compare_digest`. A user not in the file costs one scrypt computation too, with
    the default parameters, so the time of an answer tells nothing of who exists.
    Other identity types are left to the application (None).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._users = {name: _Hash.parse(text) for name, text in read_users(self.path).items()}
        self._decoy = _Hash(
            SCRYPT_N, SCRYPT_R, SCRYPT_P, secrets.token_bytes(_SALT_BYTES), b"\0" * _HASH_BYTES
        )
        self._limiter: tuple[asyncio.AbstractEventLoop, anyio.CapacityLimiter] | None = None

    def _hashing_limiter(self) -> anyio.CapacityLimiter:
        """The limiter of scrypt threads, one per event loop."""
        loop = asyncio.get_running_loop()
        if self._limiter is None or self._limiter[0] is not loop:
            self._limiter = (loop, anyio.CapacityLimiter(HASHING_LIMIT))
        return self._limiter[1]

    def __len__(self) -> int:
        return len(self._users)

    def __repr__(self) -> str:
        return f"<PasswordFile {str(self.path)!r}: {len(self._users)} user(s)>"

    async def verify(self, name: str, password: bytes) -> bool:
        known = self._users.get(name)
        hashed = known if known is not None else self._decoy
        limiter = self._hashing_limiter()
        matches = await anyio.to_thread.run_sync(hashed.matches, password, limiter=limiter)
        return matches and known is not None

    async def __call__(self, identity: UserIdentityRQ) -> Authenticated | None:
        if identity.identity_type != USERNAME_AND_PASSCODE:
            return None
        name = identity.primary_field.decode("utf-8", "replace")
        if await self.verify(name, identity.secondary_field):
            return Authenticated(name)
        return None
